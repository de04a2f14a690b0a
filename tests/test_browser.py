"""The pack in ComfyUI's own frontend (comfyui-frontend-package 1.32.9, the version ComfyUI 0.3.75
pins) in headless Debian Chromium, against a real server on 127.0.0.1: the nodes are found by the
node search, every shipped example workflow loads, is queued from the UI and completes, and the
convergence view draws on the node.

tools/provision_browser.sh installs the frontend package and Python playwright into their own
folder (only this module puts it on sys.path) and Chromium through apt when it is missing.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.comfy_runtime import REPO, ComfyServer
from tools.demo import SERVER_ARGS, SERVER_ENV, install_input_image
from tools.make_workflows import WORKFLOWS as WORKFLOW_BUILDERS
from tools.make_workflows import Workflow, build_all
from tools.workflow_api import tiny_overrides, ui_to_api

pytestmark = pytest.mark.browser

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run"]
EXTENSION_NAME = "exact_inversion.convergence"
EXTENSION_URL = "/extensions/exact-inversion/convergence.js"   # pyproject: name, [tool.comfy] web
SCREENSHOTS = Path(os.environ.get("EI_BROWSER_ARTIFACTS", REPO / ".pytest_cache" / "browser"))
# the node search box: "Search Nodes..." in the frontend ComfyUI 0.3.75 pins, "Add a node..." in 0.33's
SEARCH_BOX = ":is(input[placeholder='Search Nodes...'], input[placeholder='Add a node...']):visible"
RUN_TIMEOUT = 400   # seconds for one workflow on a busy 2-core CPU
IMAGE_SIZE = 32     # the example image is installed at 32 px: 4x4 latents keep the tiny SD1.5 UNet cheap
TEST_SIZES = tiny_overrides(IMAGE_SIZE)   # empty latents and Tree-Ring rings to match, as make demo sets them


def _provision():
    env = {**os.environ, "COMFY_PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "tools" / "provision_browser.sh")], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"tools/provision_browser.sh failed ({done.returncode}):\n{done.stderr[-3000:]}")
    line = next(l for l in done.stdout.splitlines() if l.startswith("export EI_BROWSER_SITE="))
    return line.split("=", 1)[1].strip("'\"")


@pytest.fixture(scope="module")
def site():
    path = _provision()
    if path not in sys.path:
        sys.path.insert(0, path)
    return Path(path)


@pytest.fixture(scope="module")
def server(site, tmp_path_factory):
    base = tmp_path_factory.mktemp("browser_server")
    server = ComfyServer(base, front_end_root=site / "comfyui_frontend_package" / "static",
                         extra_args=SERVER_ARGS, env=SERVER_ENV, test_nodes=False)   # the pack alone, as users install it
    install_input_image(server.base, IMAGE_SIZE)
    server.start()
    yield server
    server.stop()


class Page:
    """The ComfyUI tab, with the console errors and page errors it logged."""

    def __init__(self, page):
        self.page, self.errors = page, []
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))

    def js(self, script, arg=None):
        return self.page.evaluate(script, arg)

    def shot(self, name, **kwargs):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), **kwargs)
        return path


@pytest.fixture(scope="module")
def ui(site, server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.route("https://**", lambda route: route.abort())   # no DNS look-ups for api.comfy.org etc.
        page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        tab = Page(page)
        page.goto(server.url)
        page.wait_for_selector("canvas#graph-canvas", timeout=120_000)
        page.wait_for_function("window.app?.graph && window.app.extensions.length > 0", timeout=120_000)
        yield tab
        browser.close()


def _pack_nodes(server):
    info = server.object_info()
    return {k: v for k, v in info.items() if str(v.get("category", "")).split("/")[0] == "inversion"}


def _errors_of_interest(errors):
    """Page errors and console errors, less the ones a machine with no internet always gets."""
    harmless = ("Failed to load resource", "ERR_NAME_NOT_RESOLVED", "ERR_FAILED", "api.comfy.org",
                "user.css", "ERR_INTERNET_DISCONNECTED")
    return [e for e in errors if not any(h in e for h in harmless)]


def _shrink_for_the_test(ui):
    """Set TEST_SIZES' widget values on the canvas, as a user would type them, before queueing."""
    ui.js("""sizes => { for (const node of app.graph.nodes) {
        for (const [name, value] of Object.entries(sizes[node.type] || {})) {
            const widget = node.widgets?.find(w => w.name === name);
            if (!widget) throw new Error(`${node.type} has no widget ${name}`);
            widget.value = value;
        } } }""", TEST_SIZES)


def _queue_from_ui(ui, server):
    """Queue the graph on the canvas as the Run button does; return the /history entry."""
    queued = ui.js("""async () => {
        const api = window.comfyAPI.api.api;
        const p = await window.app.graphToPrompt();
        return await api.queuePrompt(0, p);
    }""")
    assert not queued.get("node_errors"), queued
    return server.wait(queued["prompt_id"], timeout=RUN_TIMEOUT)


def test_extension_is_served_and_registered(server, ui):
    assert EXTENSION_URL in server.get_json("/extensions")
    assert EXTENSION_NAME in ui.js("app.extensions.map(e => e.name)")


def _open_node_search(ui, attempts=5):
    """Double-click the empty canvas, as a user opens the node search. A toast or dialog that the
    frontend shows on a fresh profile can swallow the first double-click: close it and try again.
    The pointer moves there first and rests, as a user's does: a double-click that arrived with no
    pointer move before it once left the canvas without a search box three times in a row."""
    for attempt in range(attempts):
        ui.page.keyboard.press("Escape")
        ui.page.mouse.move(800, 500)
        ui.page.wait_for_timeout(200)
        ui.page.mouse.dblclick(800, 500)
        try:
            ui.page.locator(SEARCH_BOX).first.wait_for(timeout=5_000)
            return
        except Exception:
            ui.shot(f"node_search_attempt_{attempt}")
    raise AssertionError(f"the node search did not open after {attempts} double-clicks: see {SCREENSHOTS}")


def test_every_pack_node_is_registered_and_found_by_the_node_search(server, ui):
    nodes = _pack_nodes(server)
    assert len(nodes) >= 5, sorted(nodes)
    registered = ui.js("ids => ids.filter(id => !(id in LiteGraph.registered_node_types))", sorted(nodes))
    assert registered == [], f"not registered in LiteGraph: {registered}"
    ui.js("app.graph.clear()")
    missing = {}
    for node_id, info in sorted(nodes.items()):
        name = info["display_name"]
        _open_node_search(ui)
        ui.page.keyboard.type(name.split("(")[0].strip())   # what a user types; the box has the focus
        ui.page.wait_for_timeout(400)   # the search filters as you type
        options = ui.page.locator("[role='listbox'] [role='option']").all_inner_texts()
        if not any(name in text for text in options[:5]):
            missing[node_id] = options[:5]
        ui.page.keyboard.press("Escape")
        ui.page.locator(SEARCH_BOX).first.wait_for(state="detached", timeout=10_000)
    assert missing == {}, f"search results without the node (display name -> first results): {missing}"


def _comparable(workflow, pack_types):
    """The workflow less what a ComfyUI version adds to core nodes without changing the graph: outputs
    that nothing is linked to (0.33's SaveImage and PreviewImage list an IMAGE output, 0.3.75's none)."""
    workflow = json.loads(json.dumps(workflow))
    for node in workflow["nodes"]:
        if node["type"] not in pack_types:
            node["outputs"] = [o for o in node.get("outputs", []) if o.get("links")]
    return workflow


def test_example_workflows_are_the_generators_output_for_these_nodes(server):
    built, skipped = build_all(server.object_info())
    assert skipped == {}, skipped
    assert sorted(p.stem for p in WORKFLOWS) == sorted(WORKFLOW_BUILDERS)
    pack = _pack_nodes(server)
    stale = [name for name, (workflow, _) in built.items()
             if _comparable(json.loads((REPO / "example_workflows" / f"{name}.json").read_text()), pack)
             != _comparable(workflow, pack)]
    assert stale == [], f"re-run tools/make_workflows.py: {stale} no longer match the nodes' schemas"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_loads_queues_and_completes(server, ui, path):
    workflow = json.loads(path.read_text())
    ui.errors.clear()
    ui.js("async wf => { await app.loadGraphData(wf); }", workflow)
    unknown = ui.js("() => app.graph.nodes.filter(n => !(n.type in LiteGraph.registered_node_types)).map(n => n.type)")
    assert unknown == [], f"missing node types: {unknown}"
    dialogs = ui.page.locator(".p-dialog:visible").all_inner_texts()
    assert not any("missing" in d.lower() for d in dialogs), dialogs
    # the frontend's own prompt must equal what the workflow says (every widget value in its place)
    from_ui = ui.js("async () => (await app.graphToPrompt()).output")
    expected = ui_to_api(workflow, server.object_info())
    assert {k: (v["class_type"], v["inputs"]) for k, v in from_ui.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in expected.items()}
    _shrink_for_the_test(ui)
    start = time.perf_counter()
    entry = _queue_from_ui(ui, server)
    status = entry["status"]
    if status["status_str"] != "success":
        ui.shot(f"failed_{path.stem}")
    assert status["status_str"] == "success", json.dumps(status["messages"])[-2000:]
    # every workflow ends in a saved image, or (detection) in the verdict the node shows
    assert any(o.get("images") or o.get("tree_ring") for o in entry["outputs"].values()), "no image or verdict"
    assert _errors_of_interest(ui.errors) == [], ui.errors
    ui.shot(f"workflow_{path.stem}")   # the graph with its previews, for a person to look at
    print(f"{path.stem}: {time.perf_counter() - start:.1f} s")


def test_convergence_view_draws_on_decoder_inversion_node(server, ui):
    from PIL import Image
    wf = Workflow(server.object_info(), "convergence_view")
    vae = wf.node("VAELoader", (0, 0), vae_name="tiny_taesd_trained.safetensors")
    image = wf.node("LoadImage", (0, 150), extra_height=290, image="exact_inversion_cat_face.png")
    enc = wf.node("DecoderInversion", (360, 0), width=320, vae=vae[0], image=image[0], max_iterations=30)
    dec = wf.node("VAEDecode", (720, 0), samples=enc[0], vae=vae[0])
    wf.node("PreviewImage", (720, 120), extra_height=200, images=dec[0])
    ui.js("async wf => { await app.loadGraphData(wf); }", wf.to_json())
    entry = _queue_from_ui(ui, server)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[-2000:]
    record = entry["outputs"][str(enc.id)]["inversion_convergence"][0]
    assert record["series"] and record["final"], record

    # the executed message reaches the node through the websocket; then the canvas redraws it
    ui.page.wait_for_function(f"!!app.graph.getNodeById({enc.id}).inversionConvergence", timeout=30_000)
    ui.page.keyboard.press("Escape")   # no dialog or search box left over from earlier tests
    # the node's own drawing, on a canvas of its own: overlays cannot pass for it
    own = ui.js(f"""() => {{
        const node = app.graph.getNodeById({enc.id});
        const c = document.createElement("canvas");
        [c.width, c.height] = [Math.ceil(node.size[0]), Math.ceil(node.size[1])];
        const ctx = c.getContext("2d");
        node.onDrawForeground(ctx, app.canvas);
        const plot = ctx.getImageData(0, c.height - 150, c.width, 150).data;
        let painted = 0; const colours = new Set();
        for (let i = 0; i < plot.length; i += 4) {{
            if (plot[i + 3] === 0) continue;
            painted++; colours.add((plot[i] >> 4) << 8 | (plot[i + 1] >> 4) << 4 | plot[i + 2] >> 4);
        }}
        return {{painted, colours: colours.size, pixels: plot.length / 4}};
    }}""")
    assert own["painted"] > 0.5 * own["pixels"] and own["colours"] > 10, f"the node draws no plot: {own}"
    ui.js(f"""() => {{
        const node = app.graph.getNodeById({enc.id});
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [400 - node.pos[0], 200 - node.pos[1]];
        app.canvas.setDirty(true, true);
        app.canvas.draw(true, true);
    }}""")
    ui.page.wait_for_timeout(300)
    box = ui.js(f"""() => {{
        const node = app.graph.getNodeById({enc.id});
        const r = app.canvas.canvas.getBoundingClientRect();
        const [x, y] = app.canvas.ds.convertOffsetToCanvas(node.pos);
        const s = app.canvas.ds.scale;
        return {{x: r.left + x, y: r.top + y, width: node.size[0] * s, height: node.size[1] * s,
                 plot: 150 * s}};
    }}""")
    covering = ui.js("""b => {
        const el = document.elementFromPoint(b.x + b.width / 2, b.y + b.height - b.plot / 2);
        return el && el.id === "graph-canvas" ? null : (el ? el.outerHTML.slice(0, 200) : "nothing");
    }""", box)
    assert covering is None, f"something covers the node's plot on screen: {covering}"
    path = ui.shot("convergence_view_decoder_inversion",
                   clip={"x": box["x"], "y": box["y"] - 30, "width": box["width"], "height": box["height"] + 30})
    shot = Image.open(path).convert("L")
    plot = shot.crop((0, shot.height - int(box["plot"]), shot.width, shot.height))
    lo, hi = plot.getextrema()
    colours = len(Image.open(path).convert("RGB").crop(
        (0, shot.height - int(box["plot"]), shot.width, shot.height)).getcolors(maxcolors=1 << 20))
    assert hi - lo > 80 and colours > 20, (
        f"the plot area of the node looks blank (grey range {lo}..{hi}, {colours} colours): see {path}")
