"""PEFT loads a bayeslora adapter in a process that never imported bayeslora (the start-up hook)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

import _bayeslora_peft_hook as hook
import bayeslora  # noqa: F401  (registers the tuners)
from _toy_models import TwoLayers
from bayeslora.tuners import BlobConfig, BLoraConfig, MeLoraConfig

TESTS = Path(__file__).parent
CONFIGS = {
    "melora": lambda: MeLoraConfig(r=2, target_modules=["q", "v"]),
    "blob": lambda: BlobConfig(r=2, target_modules=["q", "v"]),
    "blora": lambda: BLoraConfig(r=2, target_modules=["q", "v"]),
}


def test_the_hook_keeps_no_list_of_bayeslora_types():
    ours = {str(t.value) for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items() if cls.__module__.startswith("bayeslora")}
    assert ours >= {"MELORA", "BLOB", "BLORA"}
    assert not any(name in Path(hook.__file__).read_text() for name in ('"MELORA"', '"BLOB"', '"BLORA"'))


def test_the_mapping_keeps_peft_behaviour_for_other_keys():
    mapping = hook.PeftConfigMapping({"LORA": int})
    assert mapping["LORA"] is int and mapping.get("NOPE") is None and "NOPE" not in mapping
    with pytest.raises(KeyError) as raised:
        mapping["NOPE"]
    assert type(raised.value) is KeyError


def run_fresh(script: str, **env: str) -> subprocess.CompletedProcess:
    """``script`` in a new interpreter; the hook is imported as the installed ``.pth`` does at start-up."""
    code = "import _bayeslora_peft_hook\n" + textwrap.dedent(script)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, cwd=TESTS
    )


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_peft_loads_an_adapter_without_import_bayeslora(tmp_path, method):
    torch.manual_seed(0)
    base = TwoLayers()
    model = get_peft_model(TwoLayers(), CONFIGS[method]())
    model.base_model.model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    model.save_pretrained(tmp_path / "adapter")
    state = {k: v for k, v in model.state_dict().items() if f"{method}_" in k}
    torch.save({"base": base.state_dict(), "state": state}, tmp_path / "expected.pt")
    result = run_fresh(f"""
        import json, sys, torch
        from _toy_models import TwoLayers
        from peft import PeftModel
        imported_with_peft = "bayeslora" in sys.modules
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        base = TwoLayers()
        base.load_state_dict(ref["base"])
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r})
        state = model.state_dict()
        print(json.dumps({{
            "imported_with_peft": imported_with_peft,
            "type": type(model.peft_config["default"]).__name__,
            "same": all(torch.equal(state[k], v) for k, v in ref["state"].items()),
            "missing": sorted(set(ref["state"]) - set(state)),
        }}))
    """)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["imported_with_peft"]  # bayeslora is imported on demand, not with every PEFT import
    assert report["type"] == type(CONFIGS[method]()).__name__
    assert report["same"] and not report["missing"]


def test_switched_off_the_lookup_says_what_to_import(tmp_path):
    get_peft_model(TwoLayers(), CONFIGS["melora"]()).save_pretrained(tmp_path / "adapter")
    result = run_fresh(
        f"""
        from _toy_models import TwoLayers
        from peft import PeftModel
        try:
            PeftModel.from_pretrained(TwoLayers(), {str(tmp_path / "adapter")!r})
        except KeyError as error:
            print(type(error).__name__, "|", error)
        """,
        BAYESLORA_PEFT_HOOK="0",
    )
    assert result.returncode == 0, result.stderr
    name, message = result.stdout.strip().splitlines()[-1].split(" | ")
    assert name == "BayesLoraTypeNotLoaded"
    assert "'MELORA'" in message and "import bayeslora" in message


def test_the_installed_package_runs_the_hook_at_start_up():
    files = importlib.metadata.files("bayeslora") or []  # `make setup` installs it (pip install -e)
    pth = [f for f in files if f.name == "bayeslora-peft-hook.pth"]
    assert pth, "the installed bayeslora has no bayeslora-peft-hook.pth: setup.py's build commands did not run"
    assert pth[0].read_text().strip() == "import _bayeslora_peft_hook"
    result = subprocess.run(
        [sys.executable, "-c", "import sys; print([type(f).__name__ for f in sys.meta_path])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "_PeftMappingWatcher" in result.stdout


def test_a_failed_import_of_peft_mapping_is_watched_again(tmp_path):
    """The watcher stays until ``peft.mapping`` has executed; the wrapped loader can be copied."""
    fake = tmp_path / "peft"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "mapping.py").write_text(
        "import pathlib\n"
        f"marker = pathlib.Path({str(tmp_path / 'tried')!r})\n"
        "if not marker.exists():\n"
        "    marker.touch()\n"
        "    raise ImportError('first attempt fails')\n"
        "PEFT_TYPE_TO_CONFIG_MAPPING = {}\n"
    )
    script = f"""
        import copy, sys
        sys.path.insert(0, {str(tmp_path)!r})
        try:
            import peft.mapping
        except ImportError:
            pass
        import peft.mapping
        copy.copy(peft.mapping.__loader__)
        watching = [type(f).__name__ for f in sys.meta_path if type(f).__name__ == "_PeftMappingWatcher"]
        print(type(peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING).__name__, watching)
    """
    result = run_fresh(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "PeftConfigMapping []"
