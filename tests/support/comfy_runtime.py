"""A real ComfyUI for tests, the demo and benchmarks: in-process or as a server on 127.0.0.1.

Both modes use a throw-away base directory (`prepare_base_dir`) holding custom_nodes/ with this
pack (and the test-only nodes) symlinked in, models/ pointing at the cached tiny models, and
input/, output/, user/. The ComfyUI tree comes from COMFYUI_DIR (set by tools/provision.sh).
"""
import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "comfyui-exact-inversion"
TEST_PACK_DIR_NAME = "exact-inversion-test-nodes"
TRAINED_VAE = REPO / "models" / "tiny_taesd_trained.safetensors"
PACK_PROBE_NODE = "InversionSigmas"   # present only if the pack imported


def comfyui_dir() -> Path:
    path = os.environ.get("COMFYUI_DIR")
    if not path or not (Path(path) / "main.py").exists():
        raise RuntimeError("COMFYUI_DIR is not set to a ComfyUI checkout: run `make test`, or "
                           "`eval \"$(bash tools/provision.sh)\"` first.")
    return Path(path)


def put_comfyui_on_path() -> str:
    """ComfyUI's tree first on sys.path, as its main.py sees it: its top-level `nodes` and `utils` shadow the pack's."""
    comfy_dir = str(comfyui_dir())
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    return comfy_dir


def device_args() -> list:
    """ComfyUI's device / precision flags: `--cpu` unless EI_COMFY_DEVICE=gpu (tools/gpu_check.py), plus
    EI_COMFY_ARGS (e.g. "--fp16-unet --fp16-vae"), so the same tests run on a GPU in 16 bit."""
    args = [] if os.environ.get("EI_COMFY_DEVICE", "cpu") == "gpu" else ["--cpu"]
    return args + os.environ.get("EI_COMFY_ARGS", "").split()


def comfy_python() -> str:
    return os.environ.get("COMFY_PYTHON", sys.executable)


def _cache_root() -> Path:
    root = os.environ.get("EXACT_INVERSION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "comfyui-exact-inversion")
    return Path(root)


def tiny_models_dir() -> Path:
    """Build the tiny models once per machine (keyed on the builder's source), return the folder."""
    trained = sorted((REPO / "models").glob("*.safetensors"))
    sources = [REPO / "tests" / "support" / "tiny_models.py"] + trained
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    out = _cache_root() / f"models-{key}"
    if not (out / ".ready").exists():
        cmd = [comfy_python(), str(REPO / "tests" / "support" / "tiny_models.py"), "--out", str(out)]
        if TRAINED_VAE.exists():
            cmd += ["--trained-vae", str(TRAINED_VAE)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        (out / ".ready").touch()
    return out


def prepare_base_dir(base, test_nodes=True) -> Path:
    """A ComfyUI --base-directory with this pack installed as a custom node and the tiny models."""
    base = Path(base)
    for sub in ("custom_nodes", "input", "output", "user/default", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    links = {base / "custom_nodes" / PACK_DIR_NAME: REPO, base / "models": tiny_models_dir()}
    if test_nodes:
        links[base / "custom_nodes" / TEST_PACK_DIR_NAME] = REPO / "tests" / "comfy_test_nodes"
    for link, target in links.items():
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    if not settings.exists():   # keeps the first-run dialogs out of browser tests
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    return base


@dataclass
class RunResult:
    """The outcome of one prompt: ui outputs per node id, or the error text."""
    ok: bool
    outputs: dict = field(default_factory=dict)
    error: str = ""
    messages: list = field(default_factory=list)
    base: Path = None

    def capture(self, label):
        """Tensors an EITestCapture node saved under this label."""
        from safetensors.torch import load_file
        return load_file(str(self.base / "output" / "captures" / f"{label}.safetensors"))


def _error_text(messages):
    for event, data in messages:
        if event == "execution_error":
            return f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message', '').strip()}"
        if event == "execution_interrupted":
            return f"interrupted at {data.get('node_type')} (node {data.get('node_id')})"
    return ""


class _ServerStub:
    """What PromptExecutor needs of PromptServer: it records the messages it is sent."""
    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class InProcessComfy:
    """ComfyUI imported into this process with --cpu, custom nodes initialised, prompts executed."""

    def __init__(self, base):
        self.base = prepare_base_dir(base)
        comfy_dir = put_comfyui_on_path()
        sys.argv = [os.path.join(comfy_dir, "main.py"), *device_args(), "--base-directory", str(self.base)]
        if "folder_paths" in sys.modules:
            raise RuntimeError("folder_paths was imported before InProcessComfy: its base directory is fixed")
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args   # parsed already if something imported comfy first: set what we need
        comfy.cli_args.args.cpu = "--cpu" in device_args()
        comfy.cli_args.args.base_directory = str(self.base)
        import utils.extra_config  # noqa: F401  must precede `nodes`, which shadows `utils`
        import utils.install_util  # noqa: F401
        import execution
        import nodes
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        if PACK_PROBE_NODE not in nodes.NODE_CLASS_MAPPINGS:
            raise RuntimeError("the pack did not import into ComfyUI: see the log above")
        self.nodes, self.execution = nodes, execution
        self.server = _ServerStub()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})

    def pack_module(self, name):
        """A module of the pack as ComfyUI imported it, e.g. pack_module("nodes.sampling")."""
        import importlib
        package = next(k for k in sys.modules if k.endswith(PACK_DIR_NAME) and "." not in k.split(PACK_DIR_NAME)[-1])
        return importlib.import_module(f"{package}.{name}")

    def validate(self, prompt):
        """(valid, error text) from ComfyUI's own validation."""
        valid, error, _, node_errors = asyncio.run(
            self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        if valid:
            return True, ""
        return False, json.dumps({"error": error, "node_errors": node_errors}, default=str)

    def run(self, prompt) -> RunResult:
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, _ = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            return RunResult(False, error=self.validate(prompt)[1], base=self.base)
        self.executor.reset()   # fresh caches: every run really executes
        self.executor.execute(prompt, prompt_id, {}, outputs)
        messages = self.executor.status_messages
        ok = self.executor.success and any(e == "execution_success" for e, _ in messages)
        return RunResult(ok, self.executor.history_result.get("outputs", {}), _error_text(messages),
                         messages, self.base)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptRejected(RuntimeError):
    """POST /prompt answered 400: the body says which node and input."""


class ComfyServer:
    """`main.py --cpu --listen 127.0.0.1` on a free port, with the pack symlinked into custom_nodes."""

    def __init__(self, base, port=None, front_end_root=None, extra_args=(), test_nodes=True, env=None):
        self.base = prepare_base_dir(base, test_nodes=test_nodes)   # test_nodes=False: as users install it
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if front_end_root is None:   # no frontend package needed for API-only use
            front_end_root = self.base / "frontend"
            front_end_root.mkdir(exist_ok=True)
            (front_end_root / "index.html").write_text("<html>headless</html>")
        self.front_end_root = front_end_root
        self.extra_args = list(extra_args)
        self.env = dict(env or {})   # added to the server's environment (e.g. OMP_NUM_THREADS)
        self.proc = None
        self.log_path = self.base / "server.log"

    def start(self, timeout=120):
        cmd = [comfy_python(), str(comfyui_dir() / "main.py"), *device_args(), "--listen", "127.0.0.1",
               "--port", str(self.port), "--disable-auto-launch", "--base-directory", str(self.base)]
        if self.front_end_root:
            cmd += ["--front-end-root", str(self.front_end_root)]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd + self.extra_args, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=str(comfyui_dir()), env={**os.environ, **self.env} if self.env else None)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                info = self.get_json(f"/object_info/{PACK_PROBE_NODE}")
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
                continue
            if PACK_PROBE_NODE not in info:   # main.py keeps running when a custom node fails
                self.stop()
                raise RuntimeError(f"the pack did not import into ComfyUI:\n{self.log_tail()}")
            return self
        self.stop()
        raise TimeoutError(f"ComfyUI was not ready in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n=60):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def get_json(self, path, timeout=30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, path, payload, timeout=30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            return json.loads(body) if body else {}

    def object_info(self):
        return self.get_json("/object_info")

    def queue(self, prompt):
        try:
            return self.post_json("/prompt", {"prompt": prompt, "client_id": "tests"})["prompt_id"]
        except urllib.error.HTTPError as e:
            if e.code == 400:
                raise PromptRejected(e.read().decode(errors="replace")) from None
            raise

    def wait(self, prompt_id, timeout=300):
        """The /history entry of a finished prompt."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, prompt, timeout=300) -> RunResult:
        try:
            prompt_id = self.queue(prompt)
        except PromptRejected as e:
            return RunResult(False, error=str(e), base=self.base)
        entry = self.wait(prompt_id, timeout)
        messages = [tuple(m) for m in entry["status"].get("messages", [])]
        ok = entry["status"]["status_str"] == "success"
        return RunResult(ok, entry.get("outputs", {}), _error_text(messages), messages, self.base)

    def interrupt(self):
        self.post_json("/interrupt", {})

    def rss_bytes(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS for the server process")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
