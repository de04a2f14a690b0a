"""Developer tooling: ComfyUI provisioning, the test/demo runtime, tiny models. Not used by the pack."""
