"""What developers use and users never install: the real-ComfyUI harness (in-process and server),
the tiny-model builders, the analytic reference models and the reference samplers."""
