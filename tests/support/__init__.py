"""What the tests share and are not tests themselves: tiny offline models (``tiny_models``), char-level tokenizers and
a tiny Qwen3 (``chat``), trainer/config builders (``training``), analysis fixtures (``analysis``), a scripted evaluation backend and toy rows (``evaluation``), accelerate
launches (``launchers``) and the instrumented training entry they run (``launch_probe``). Imported as
``from support.X import ...``: tests/conftest.py puts tests/ on the path."""
