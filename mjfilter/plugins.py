"""Plugin manager factory, entry-point loading, and the typed hook facade.

Only the plugins the configuration names are loaded (never every installed
entry point). ``Hooks`` is the only place the engine calls hooks; it calls them
one plugin at a time so the chain order is the YAML's, not pluggy's.
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
from dataclasses import dataclass
from typing import Any
from collections.abc import Iterable

import pluggy

from . import hookspecs

GROUP = "mjfilter.plugins"


class PluginError(Exception):
    """A plugin that cannot be found or loaded; the message names it and its distribution."""


@dataclass(frozen=True, slots=True)
class PluginInfo:
    name: str
    value: str  # "module:attr" of the entry point
    distribution: str
    version: str
    hooks: tuple[str, ...]


def make_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("mjfilter")
    pm.add_hookspecs(hookspecs)
    return pm


def available_plugins() -> dict[str, md.EntryPoint]:
    return {ep.name: ep for ep in md.entry_points(group=GROUP)}


def distribution_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ("unknown", "")
    return (dist.metadata["Name"] or "unknown", dist.version or "")


def load_plugins(pm: pluggy.PluginManager, names: Iterable[str]) -> dict[str, PluginInfo]:
    """Load and register the named entry points; ``pm.check_pending()`` afterwards."""
    eps = available_plugins()
    infos: dict[str, PluginInfo] = {}
    for name in names:
        if name in infos:
            continue
        ep = eps.get(name)
        if ep is None:
            known = ", ".join(sorted(eps)) or "none"
            raise PluginError(f"unknown plugin {name!r} (installed plugins: {known})")
        dist, version = distribution_of(ep)
        try:
            obj = ep.load()
        except Exception as e:
            raise PluginError(
                f"plugin {name!r} ({ep.value}, from distribution {dist} {version}) failed to import: "
                f"{type(e).__name__}: {e}"
            ) from e
        if pm.get_plugin(name) is None:
            try:
                pm.register(obj, name=name)
            except Exception as e:
                raise PluginError(f"plugin {name!r} from {dist} {version} cannot be registered: {e}") from e
        impls = tuple(sorted(hc.name for hc in pm.get_hookcallers(obj) or ()))
        infos[name] = PluginInfo(name, ep.value, dist, version, impls)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"a plugin implements a hook that does not exist: {e}") from e
    return infos


class Hooks:
    """Typed calls of one plugin's hooks, with the awaitables they may return resolved by ``resolve``."""

    __slots__ = ("_pm", "_callers")

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm
        self._callers: dict[tuple[str, str], Any] = {}

    def _caller(self, hook: str, plugin: str) -> Any:
        key = (hook, plugin)
        caller = self._callers.get(key)
        if caller is None:
            target = self._pm.get_plugin(plugin)
            if target is None:
                raise PluginError(f"plugin {plugin!r} is not loaded")
            others = [p for p in self._pm.get_plugins() if p is not target]
            caller = self._pm.subset_hook_caller(hook, remove_plugins=others)
            self._callers[key] = caller
        return caller

    def config_model(self, plugin: str) -> Any:
        return self._caller("mjfilter_config_model", plugin)()

    def capabilities(self, plugin: str, config: Any) -> frozenset[str]:
        return frozenset(self._caller("mjfilter_capabilities", plugin)(config=config) or ())

    def startup(self, plugin: str, app: Any, config: Any, step: str) -> list[Any]:
        return self._caller("mjfilter_startup", plugin)(app=app, config=config, step=step)

    def message(self, plugin: str, txn: Any, actions: Any, config: Any, app: Any) -> list[Any]:
        return self._caller("mjfilter_message", plugin)(txn=txn, actions=actions, config=config, app=app)

    def transaction_end(self, plugin: str, txn: Any, outcome: Any, config: Any, app: Any) -> list[Any]:
        return self._caller("mjfilter_transaction_end", plugin)(txn=txn, outcome=outcome, config=config, app=app)

    def shutdown(self, plugin: str, app: Any, config: Any, step: str) -> list[Any]:
        return self._caller("mjfilter_shutdown", plugin)(app=app, config=config, step=step)


def pending_awaitables(results: list[Any]) -> list[Any]:
    return [r for r in results if inspect.isawaitable(r)]
