"""Start-up hook (run by ``bayeslora-peft-hook.pth``): PEFT loads a bayeslora adapter without ``import bayeslora``.

PEFT looks an adapter's config class up as ``PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]``, and bayeslora's types
(``MELORA``, ``BLOB``, ``BLORA``, and any a later version adds) are registered only when bayeslora is imported.
Without this hook, ``PeftModel.from_pretrained(base, "run/adapter")`` in a process that never imported bayeslora
stops with a bare ``KeyError: 'MELORA'``.

The ``.pth`` file installed with the package imports this module at interpreter start. It uses the standard
library only and does nothing until PEFT itself is imported: it waits for ``peft.mapping`` to be executed and then
gives that one mapping a ``__missing__``. A lookup of a type PEFT does not know imports bayeslora (which registers
its types) and looks again; a type still unknown raises PEFT's usual ``KeyError``. The hook keeps no list of
bayeslora's types, so a new tuner needs no change here. With ``BAYESLORA_PEFT_HOOK=0`` nothing is imported on
demand and the lookup raises :class:`BayesLoraTypeNotLoaded`, a ``KeyError`` whose message says to
``import bayeslora``. Nothing else of PEFT is touched, and lookups of registered types are plain ``dict`` lookups.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: every interpreter of the environment imports this module
if TYPE_CHECKING:
    from typing import Any

#: The module whose mapping is patched, and the mapping's name in it.
PEFT_MAPPING_MODULE = "peft.mapping"
CONFIG_MAPPING = "PEFT_TYPE_TO_CONFIG_MAPPING"
#: ``0`` turns on-demand importing off (the lookup then raises the explanatory error).
SWITCH = "BAYESLORA_PEFT_HOOK"


class BayesLoraTypeNotLoaded(KeyError):
    """A bayeslora adapter type was looked up before bayeslora registered it with PEFT."""

    def __str__(self) -> str:  # KeyError would print the message as a quoted repr
        return str(self.args[0])


def _type_name(key: Any) -> str:
    return str(getattr(key, "value", key))


class PeftConfigMapping(dict):
    """``PEFT_TYPE_TO_CONFIG_MAPPING`` that imports bayeslora, which registers its types, on the first lookup of a
    type PEFT does not know."""

    def __missing__(self, key: Any) -> Any:
        name = _type_name(key)
        fix = "Add `import bayeslora` before loading it (or export it with `bayeslora export --to lora`)."
        if os.environ.get(SWITCH, "1") == "0":
            raise BayesLoraTypeNotLoaded(
                f"PEFT knows no adapter type {name!r}. If this is a bayeslora adapter, PEFT learns its type when "
                f"bayeslora is imported. {fix}"
            )
        if "bayeslora" in sys.modules:  # already imported: the type is not one of bayeslora's
            raise KeyError(key)
        try:
            import bayeslora  # noqa: F401  (registers its PEFT types)
        except ImportError:
            raise KeyError(key) from None  # bayeslora is not installed in this environment
        except Exception as error:
            raise BayesLoraTypeNotLoaded(
                f"PEFT knows no adapter type {name!r}, and importing bayeslora, which would register it if it is a "
                f"bayeslora adapter, failed ({type(error).__name__}: {error}). Reinstall bayeslora, then "
                f"{fix[0].lower()}{fix[1:]}"
            ) from error
        if key in self:
            return dict.__getitem__(self, key)
        raise KeyError(key)


class _PatchAfterExec:
    """Loader wrapper: runs the real loader, then installs :class:`PeftConfigMapping` in the module and
    retires the watcher (if the module fails to execute, the watcher stays for the next attempt)."""

    def __init__(self, loader: Any, watcher: _PeftMappingWatcher) -> None:
        self._loader = loader
        self._watcher = watcher

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ... of the real loader
        if name in ("_loader", "_watcher"):  # not yet set (copy.copy creates the object without __init__)
            raise AttributeError(name)
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        install(module)
        self._watcher.retire()


class _PeftMappingWatcher:
    """``sys.meta_path`` entry that wraps the loader of ``peft.mapping``, found by the other finders."""

    def __init__(self) -> None:
        self._looking = False  # find_spec below asks the import system, which asks this finder again

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != PEFT_MAPPING_MODULE or self._looking:
            return None
        import importlib.util

        self._looking = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._looking = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchAfterExec(spec.loader, self)
        return spec

    def retire(self) -> None:
        sys.meta_path[:] = [finder for finder in sys.meta_path if finder is not self]


def install(module: Any) -> bool:
    """Replace ``module.PEFT_TYPE_TO_CONFIG_MAPPING`` (a plain dict) by a :class:`PeftConfigMapping` with the same
    entries. Safe only before other modules bind the name, i.e. right after ``peft.mapping`` executes."""
    mapping = getattr(module, CONFIG_MAPPING, None)
    if type(mapping) is not dict:  # already installed, or a PEFT that keeps it elsewhere: leave PEFT alone
        return False
    setattr(module, CONFIG_MAPPING, PeftConfigMapping(mapping))
    return True


def activate() -> None:
    """Called at start-up: watch for ``peft.mapping`` unless it is already imported (then nothing is done)."""
    if PEFT_MAPPING_MODULE in sys.modules:
        return
    if not any(isinstance(finder, _PeftMappingWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PeftMappingWatcher())


activate()  # an error here is reported by `site` ("Error processing line 1 of ...pth"), start-up goes on
