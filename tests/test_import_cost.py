"""What every process of a deploy pays on import: Serve's build task imports the app only to build it, and
every Ray worker imports ray. Both were seconds of CPU on 2 cores (benchmarks/cold_start.py --served)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys


def test_building_the_app_imports_neither_torch_nor_transformers():
    code = ("import sys, llmserve_nb.server.app, llmserve_nb.engine as e; "
            "assert callable(e.create_engine); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_model_side_still_loads_on_first_use():
    import llmserve_nb.engine as engine

    from llmserve_nb.engine.scheduler import TransformersEngine

    assert engine.TransformersEngine is TransformersEngine
    assert {"HFEngine", "ContinuousBatcher", "TransformersEngine"} <= set(engine.__all__)
    try:
        engine.NoSuchThing  # noqa: B018
    except AttributeError as e:
        assert "NoSuchThing" in str(e)
    else:
        raise AssertionError("an unknown attribute of llmserve_nb.engine did not raise")


def test_the_venv_has_no_grammar_compiled_on_every_import_of_ray():
    # `make install` removes rfc3987-syntax (see the Makefile): jsonschema, which `import ray` loads, would
    # compile its Lark grammar in every Ray worker process.
    assert importlib.util.find_spec("rfc3987_syntax") is None
