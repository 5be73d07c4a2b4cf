"""Register edgequant with transformers' quantizer registry without importing transformers at `import edgequant`.

Importing `transformers.quantizers.auto` (the registry) pulls in torch and every quantizer and takes seconds, while
`import edgequant` must stay instant for the command line. So `install()` registers at once only when transformers has
already loaded its registry; otherwise it leaves a one-shot import hook that registers right after transformers loads
it (which `from_pretrained` always does first). The registration itself lives in `edgequant.hf_integration`.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

REGISTRY_MODULE = "transformers.quantizers.auto"


def _register():
    try:
        from . import hf_integration
        hf_integration.register()
    except Exception as e:  # noqa: BLE001 - a transformers release with another API must not break transformers
        warnings.warn(f"edgequant could not register its quantizer with transformers ({type(e).__name__}: {e}); "
                      "`from_pretrained` will not load edgequant checkpoints", stacklevel=2)


class _Loader(importlib.abc.Loader):
    """Runs the registry module's own loader, then registers."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        uninstall()  # one shot; also keeps the lookup below from finding this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


_FINDER = _Finder()


def uninstall():
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install():
    """Register now if transformers' registry is loaded, else when it is."""
    if REGISTRY_MODULE in sys.modules:
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
