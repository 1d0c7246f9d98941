"""Method registry: `@register_method("sam")`, then list and build by name.

Each method lives in its own module of this package, found on first use (every module here but
`base` is imported), so a new method is one new file. Its class says how tables show it
(`display`, the paper's name, and `paper_row`, its row in the paper's Table 1) and what kind of
method it is (`category`).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from pydantic import ValidationError

from sam_peft.errors import ConfigKeyError
from sam_peft.methods.base import Method, MethodOptions, SparseOptions, TrainPlan

_REGISTRY: dict[str, type[Method]] = {}

_loaded = False


def register_method(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method '{name}' registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_all() -> None:
    """Import every method module of this package (each registers its methods)."""
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def method_display(name: str) -> str:
    """The paper's name of a registered method (its class's `display`), else the name itself."""
    _load_all()
    cls = _REGISTRY.get(name)
    return getattr(cls, "display", None) or name if cls else name


def paper_rows() -> list[str]:
    """Display names of the registered methods in the paper's row order (then the others by name)."""
    _load_all()
    classes = sorted(_REGISTRY.values(), key=lambda c: (c.paper_row is None, c.paper_row or 0, c.display or c.name))
    return [c.display or c.name for c in classes]


def list_methods() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    _load_all()
    if name not in _REGISTRY:
        guess = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        raise ConfigKeyError(
            "method.name", f"unknown method '{name}'{hint}; known: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def validate_method_options(spec) -> dict:
    """A `method:` mapping -> the same mapping with defaults filled in, or a ConfigKeyError."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise ConfigKeyError("method", "expected a mapping with 'name' and the method's options")
    if "name" not in spec:
        raise ConfigKeyError("method", "missing 'name' (one of: " + ", ".join(list_methods()) + ")")
    cls = method_class(spec["name"])
    try:
        opts = cls.Options.model_validate(spec)
    except ValidationError as err:
        e = err.errors()[0]
        key = "method." + ".".join(str(x) for x in e["loc"])
        from sam_peft.config import ALIASES, message_of

        if e["type"] == "extra_forbidden":
            fields = list(cls.Options.model_fields)
            alias = ALIASES.get(str(e["loc"][-1]))
            guess = [alias] if alias in fields else difflib.get_close_matches(str(e["loc"][-1]), fields, n=1)
            hint = f" (did you mean 'method.{guess[0]}'?)" if guess else ""
            raise ConfigKeyError(key, f"unknown key '{key}' for method '{spec['name']}'{hint}") from None
        msg = message_of(e)
        raise ConfigKeyError(key, f"key '{key}': {msg}") from None
    return opts.model_dump()


def build_method(spec: dict) -> Method:
    cls = method_class(spec["name"])
    return cls(cls.Options.model_validate(spec))


__all__ = [
    "Method",
    "MethodOptions",
    "SparseOptions",
    "TrainPlan",
    "build_method",
    "list_methods",
    "method_class",
    "method_display",
    "paper_rows",
    "register_method",
    "validate_method_options",
]
