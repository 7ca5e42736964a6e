"""Plugin discovery: selectors and tokenizer adapters found through ``imadarem`` entry points.

The built-in plugins are registered by this package's own entry points, the same path a third party
uses. Entry points are loaded one at a time rather than with ``PluginManager.load_setuptools_entrypoints``
because that call stops at the first plugin that fails to import and silently drops a second entry point
with an already-used name; here each failure is recorded against its distribution and the rest load.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import json
import re
from dataclasses import dataclass
from typing import Any

import click
import pluggy
from imadarem.runtime import hookspecs
from imadarem.runtime.drawer import SampleDrawer
from imadarem.runtime.errors import ImadaremError, PluginError, TokenizerError, UnknownPluginError
from imadarem.runtime.prompt_reader import PromptReader
from imadarem.runtime.selector import Selector
from imadarem.runtime.tokenizer import TokenizerAdapter

GROUP = hookspecs.PROJECT
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")
# kind -> (hook name, base class); a command is a click.Command instance, the others are classes
KINDS = {
    "selector": ("imadarem_selectors", Selector),
    "tokenizer": ("imadarem_tokenizers", TokenizerAdapter),
    "prompt_reader": ("imadarem_prompt_readers", PromptReader),
    "drawer": ("imadarem_sample_drawers", SampleDrawer),
    "command": ("imadarem_commands", click.Command),
}


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    distribution: str
    version: str
    module: str
    summary: str
    cls: Any = None

    def as_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "summary": self.summary,
        }


@dataclass(frozen=True)
class PluginProblem:
    distribution: str
    version: str
    entry_point: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {
            "kind": "error",
            "distribution": self.distribution,
            "version": self.version,
            "entry_point": self.entry_point,
            "message": self.message,
        }

    def __str__(self) -> str:
        return f"plugin {self.entry_point!r} from distribution {self.distribution} {self.version}: {self.message}"


def _dist_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "?"
    return dist.metadata["Name"] or "unknown", dist.version or "?"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class Registry:
    """All selectors and tokenizer adapters the installed plugins provide."""

    def __init__(self, entry_points: list[metadata.EntryPoint] | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.problems: list[PluginProblem] = []
        self._plugins: dict[str, dict[str, PluginInfo]] = {kind: {} for kind in KINDS}
        if entry_points is None:
            entry_points = list(metadata.entry_points(group=GROUP))
        self._load(entry_points)

    # -- loading ---------------------------------------------------------------------------------
    def _load(self, entry_points: list[metadata.EntryPoint]) -> None:
        seen: set[tuple[str, str, str]] = set()
        ordered = []
        for ep in entry_points:
            dist, version = _dist_of(ep)
            key = (dist, ep.name, ep.value)
            if key in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(key)
            ordered.append((dist != "imadarem", dist, ep.name, ep, version))
        # Built-ins first, then third parties in a stable order: a name clash always blames the newcomer.
        ordered.sort(key=lambda item: item[:3])
        for _, dist, _, ep, version in ordered:
            self._load_one(ep, dist, version)

    def _problem(self, dist: str, version: str, ep_name: str, message: str) -> None:
        self.problems.append(PluginProblem(dist, version, ep_name, message))

    def _load_one(self, ep: metadata.EntryPoint, dist: str, version: str) -> None:
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            self._problem(dist, version, ep.name, f"failed to import {ep.value!r}: {_short(exc)}")
            return
        reg_name = f"{dist}:{ep.name}"
        try:
            self.pm.register(plugin, name=reg_name)
            self.pm.check_pending()
        except Exception as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._problem(dist, version, ep.name, f"invalid hook implementation: {_short(exc)}")
            return
        module = getattr(plugin, "__name__", ep.value)
        for kind, (hook_name, base) in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is plugin:
                    self._collect(kind, base, hook_name, impl, dist, version, ep.name, module)

    def _collect(self, kind, base, hook_name, impl, dist, version, ep_name, module) -> None:
        try:
            result = impl.function()
        except Exception as exc:
            self._problem(dist, version, ep_name, f"{hook_name}() raised {_short(exc)}")
            return
        if not isinstance(result, (list, tuple)):
            self._problem(dist, version, ep_name, f"{hook_name}() must return a list of classes, got {type(result).__name__}")
            return
        for cls in result:
            if kind == "command":
                if not isinstance(cls, click.Command):
                    self._problem(dist, version, ep_name, f"{hook_name}() returned {cls!r}, which is not a click command")
                    continue
                name = cls.name
                summary = cls.get_short_help_str(limit=80)
            else:
                if not (isinstance(cls, type) and issubclass(cls, base)):
                    self._problem(dist, version, ep_name,
                                  f"{hook_name}() returned {cls!r}, which is not a subclass of {base.__name__}")
                    continue
                name = getattr(cls, "name", None)
                summary = getattr(cls, "summary", "") or (cls.__doc__ or "").strip().split("\n")[0]
            if not isinstance(name, str) or not _NAME_RE.match(name):
                what = f"command {cls!r}" if kind == "command" else f"{kind} class {cls.__name__}"
                self._problem(dist, version, ep_name, f"{what} has no valid 'name' ({name!r})")
                continue
            if getattr(cls, "__abstractmethods__", None):
                missing = ", ".join(sorted(cls.__abstractmethods__))
                self._problem(dist, version, ep_name, f"{kind} {name!r} does not implement {missing}")
                continue
            existing = self._plugins[kind].get(name)
            if existing is not None:
                self._problem(dist, version, ep_name,
                              f"{kind} name {name!r} is already provided by distribution "
                              f"{existing.distribution} {existing.version}; this one is ignored")
                continue
            self._plugins[kind][name] = PluginInfo(kind, name, dist, version, module, summary, cls)

    # -- queries ---------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._plugins[kind])

    def get(self, kind: str, name: str) -> PluginInfo:
        info = self._plugins[kind].get(name)
        if info is None:
            available = ", ".join(self.names(kind)) or "none installed"
            broken = "; ".join(str(p) for p in self.problems)
            hint = f"; note that {broken}" if broken else ""
            raise UnknownPluginError(f"unknown {kind} {name!r} (available: {available}){hint}")
        return info

    def plugins(self) -> list[PluginInfo]:
        return [info for kind in KINDS for _, info in sorted(self._plugins[kind].items())]


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The process-wide registry, built from the installed entry points on first use."""
    return Registry()


def get_selector_class(name: str) -> type[Selector]:
    return default_registry().get("selector", name).cls


def get_tokenizer_class(name: str) -> type[TokenizerAdapter]:
    return default_registry().get("tokenizer", name).cls


def prompt_reader_for(prompt: str | None, tokenizer: TokenizerAdapter) -> PromptReader | None:
    """The first installed prompt reader (by name) that accepts ``prompt``, or None (a template or prefix)."""
    if not prompt:
        return None
    registry = default_registry()
    for name in registry.names("prompt_reader"):
        reader = registry.get("prompt_reader", name).cls()
        if reader.accepts(prompt, tokenizer):
            return reader
    return None


def drawer_for(tokenizer: TokenizerAdapter) -> SampleDrawer | None:
    """The first installed sample drawer (by name) that draws this tokenizer's texts, or None."""
    registry = default_registry()
    for name in registry.names("drawer"):
        drawer = registry.get("drawer", name).cls()
        if drawer.accepts(tokenizer):
            return drawer
    return None


def create_selector(name: str, **options: Any) -> Selector:
    """Look a selector up by name and build it with ``options`` (clear errors for both)."""
    cls = get_selector_class(name)
    try:
        return cls.create(**options)
    except ImadaremError:
        raise
    except Exception as exc:  # the plugin's own constructor broke: blame it, not the caller
        raise PluginError(f"{selector_label(cls)} failed to start: {_short(exc)}") from exc


def plugin_of(obj: Any) -> PluginInfo | None:
    """The registered plugin whose class ``obj`` is (or is an instance of), if any."""
    cls = obj if isinstance(obj, type) else type(obj)
    for info in default_registry().plugins():
        if info.cls is cls:
            return info
    return None


def plugin_label(kind: str, obj: Any) -> str:
    """How errors name a plugin object or class: its kind, name and the distribution that ships it."""
    info = plugin_of(obj)
    name = getattr(obj, "name", type(obj).__name__)
    if info is None:
        module = (obj if isinstance(obj, type) else type(obj)).__module__
        return f"{kind} {name!r} (class from module {module}, not an installed plugin)"
    return f"{kind} {name!r} from distribution {info.distribution} {info.version}"


def selector_label(selector: Any) -> str:
    return plugin_label("selector", selector)


def selector_call(selector: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call a selector's hook; an exception inside the plugin becomes a one-line PluginError naming the
    selector and its distribution (a fault in a plugin is not reported as Imadarem's)."""
    try:
        return getattr(selector, method)(*args, **kwargs)
    except ImadaremError:
        raise
    except Exception as exc:
        raise PluginError(f"{selector_label(selector)} failed in {method}(): {_short(exc)}") from exc


def tokenizer_to_json(tokenizer: TokenizerAdapter) -> str:
    """The model file's ``imadarem.tokenizer`` value: adapter name plus its spec."""
    return json.dumps({"adapter": tokenizer.name, "spec": tokenizer.to_spec()}, sort_keys=True)


def tokenizer_origin(tokenizer: TokenizerAdapter) -> dict[str, str] | None:
    """The distribution (name, version) whose plugin provides ``tokenizer``'s adapter, if installed."""
    info = plugin_of(tokenizer)
    return None if info is None else {"name": info.distribution, "version": info.version}


def tokenizer_from_json(text: str) -> TokenizerAdapter:
    """Rebuild an adapter from ``tokenizer_to_json`` output, finding its class among the plugins."""
    try:
        data = json.loads(text)
        adapter, spec = data["adapter"], data["spec"]
    except (ValueError, TypeError, KeyError) as exc:
        raise TokenizerError(f"tokenizer spec is not valid JSON with 'adapter' and 'spec': {exc}") from None
    cls = get_tokenizer_class(adapter)
    try:
        return cls.from_spec(spec)
    except ImadaremError:
        raise
    except Exception as exc:  # the adapter broke on its own spec: blame it
        raise PluginError(f"{plugin_label('tokenizer', cls)} cannot rebuild the tokenizer from its spec: "
                          f"{_short(exc)}") from exc


def commands() -> list[click.Command]:
    """The click commands plugins add to ``imadarem`` (the development side's among them)."""
    return [info.cls for info in default_registry().plugins() if info.kind == "command"]


def list_plugins() -> list[PluginInfo]:
    return default_registry().plugins()


def plugin_problems() -> list[PluginProblem]:
    return list(default_registry().problems)


