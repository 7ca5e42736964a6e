"""The plugin registry: lookup, listing, and isolation of broken plugins (fake distributions on disk)."""

import importlib.metadata as md
import textwrap

import pytest
from imadarem.runtime import Selector, SelectorError, UnknownPluginError, create_selector, get_selector_class
from imadarem.runtime.registry import Registry

BUILTIN_SELECTORS = {"confidence", "critic", "entropy", "gate", "l2r", "maskgit", "overwrite", "uniform"}
BUILTIN_TOKENIZERS = {"char", "hf", "selfies"}

GOOD = """
from imadarem.runtime import Decision, Selector, hookimpl

class Greedy(Selector):
    name = "{name}"
    def select(self, state):
        return Decision(update=state.editable)

@hookimpl
def imadarem_selectors():
    return [Greedy]
"""


def make_dist(root, dist, version, modules: dict[str, str], entry_points: dict[str, str]):
    """Write an installed-looking distribution (dist-info + modules) under ``root``."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[imadarem]\n{eps}\n")
    for mod, src in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(src))


def registry_with(tmp_path, monkeypatch, dists):
    monkeypatch.syspath_prepend(str(tmp_path))
    for args in dists:
        make_dist(tmp_path, *args)
    eps = list(md.entry_points(group="imadarem"))
    eps += [ep for d in md.distributions(path=[str(tmp_path)]) for ep in d.entry_points if ep.group == "imadarem"]
    return Registry(entry_points=eps)


def test_builtins_are_found_through_entry_points():
    reg = Registry()
    assert set(reg.names("selector")) >= BUILTIN_SELECTORS
    assert set(reg.names("tokenizer")) >= BUILTIN_TOKENIZERS
    infos = {(p.kind, p.name): p for p in reg.plugins()}
    assert infos[("selector", "gate")].distribution == "imadarem"
    assert infos[("tokenizer", "selfies")].version == md.version("imadarem")
    assert not reg.problems


def test_lookup_unknown_name_lists_available():
    with pytest.raises(UnknownPluginError, match=r"unknown selector 'nope' \(available: confidence, critic, entropy, gate"):
        get_selector_class("nope")


def test_bad_selector_options_are_clear():
    with pytest.raises(SelectorError, match="has no option bogus"):
        create_selector("gate", bogus=1)
    with pytest.raises(Exception, match=r"threshold must be in \[0, 1\]"):
        create_selector("gate", threshold=3)
    with pytest.raises(Exception, match="schedule must be 'linear' or 'cosine'"):
        create_selector("maskgit", schedule="square")
    assert isinstance(create_selector("maskgit", schedule="linear"), Selector)


def test_broken_plugins_are_isolated_and_named(tmp_path, monkeypatch):
    reg = registry_with(tmp_path, monkeypatch, [
        ("good-plugin", "1.0", {"good_mod": GOOD.format(name="greedy")}, {"good": "good_mod"}),
        ("import-fails", "2.0", {"boom_mod": "raise RuntimeError('kaboom')"}, {"boom": "boom_mod"}),
        ("wrong-type", "3.0", {"wrong_mod": """
            from imadarem.runtime import hookimpl
            @hookimpl
            def imadarem_selectors():
                return "not a list"
            @hookimpl
            def imadarem_tokenizers():
                return [int]
        """}, {"wrong": "wrong_mod"}),
        ("name-thief", "4.0", {"thief_mod": GOOD.format(name="gate")}, {"thief": "thief_mod"}),
        ("hook-raises", "5.0", {"raiser_mod": """
            from imadarem.runtime import hookimpl
            @hookimpl
            def imadarem_selectors():
                raise ValueError('inside hook')
        """}, {"raiser": "raiser_mod"}),
        ("bad-hook", "6.0", {"badhook_mod": """
            from imadarem.runtime import hookimpl
            @hookimpl
            def imadarem_selectorz():
                return []
        """}, {"badhook": "badhook_mod"}),
    ])
    problems: dict[str, str] = {}
    for p in reg.problems:
        problems[p.distribution] = problems.get(p.distribution, "") + p.message + "\n"
    assert "kaboom" in problems["import-fails"] and "failed to import" in problems["import-fails"]
    assert "must return a list" in problems["wrong-type"]
    assert "not a subclass of TokenizerAdapter" in problems["wrong-type"]
    assert "already provided by distribution imadarem" in problems["name-thief"]
    assert "inside hook" in problems["hook-raises"]
    assert "invalid hook implementation" in problems["bad-hook"]
    assert len(reg.problems) == 7 - 1  # wrong-type has two problems; good-plugin none
    # the rest keeps working: the good plugin and every built-in
    assert reg.get("selector", "greedy").distribution == "good-plugin"
    assert reg.get("selector", "gate").distribution == "imadarem"
    assert set(reg.names("selector")) == BUILTIN_SELECTORS | {"greedy"}
    assert str(reg.problems[0]).startswith("plugin ")


def test_two_third_parties_with_one_name_blame_the_later(tmp_path, monkeypatch):
    reg = registry_with(tmp_path, monkeypatch, [
        ("aaa-plugin", "1.0", {"a_mod": GOOD.format(name="dup")}, {"a": "a_mod"}),
        ("zzz-plugin", "1.0", {"z_mod": GOOD.format(name="dup")}, {"z": "z_mod"}),
    ])
    assert reg.get("selector", "dup").distribution == "aaa-plugin"
    assert [p.distribution for p in reg.problems] == ["zzz-plugin"]
