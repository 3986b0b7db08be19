"""The executor registry: one lookup from task kind to executor, loud on unknown kinds."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipo.runtime import EXECUTORS, Compute, Executors, LoadWeight, Task, UnknownTaskKind, executor


@dataclass(frozen=True, slots=True)
class RegistryProbe(Task):
    """A kind only this module registers."""

    tag: str


@dataclass(frozen=True, slots=True)
class SubProbe(RegistryProbe):
    """A subclass: inherits its parent's executor unless it has its own."""


def test_register_find_and_lookup():
    table = Executors()
    fn = table.register(Compute, lambda task, ctx: "c")
    assert table.find(Compute) is fn and table.lookup(Compute) is fn
    assert table.find(LoadWeight) is None


def test_decorator_form_returns_the_function():
    table = Executors()

    @table.register(LoadWeight)
    def load(task, ctx):
        return "loaded"

    assert load(None, None) == "loaded" and table.lookup(LoadWeight) is load


def test_lookup_of_an_unknown_kind_names_it_and_says_how_to_register():
    with pytest.raises(UnknownTaskKind, match=r"no executor registered for task kind RegistryProbe;"
                                              r" register one with @executor\(RegistryProbe\)"):
        Executors().lookup(RegistryProbe)


def test_subclasses_inherit_their_base_executor_until_they_register_their_own():
    table = Executors()
    base = table.register(RegistryProbe, lambda task, ctx: "base")
    assert table.lookup(SubProbe) is base
    own = table.register(SubProbe, lambda task, ctx: "own")
    assert table.lookup(SubProbe) is own and table.lookup(RegistryProbe) is base


def test_child_falls_back_to_parent_and_overrides_without_touching_it():
    parent = Executors()
    parent_fn = parent.register(Compute, lambda task, ctx: "parent")
    child = parent.child()
    assert child.lookup(Compute) is parent_fn
    child_fn = child.register(Compute, lambda task, ctx: "child")
    assert child.lookup(Compute) is child_fn and parent.lookup(Compute) is parent_fn
    parent.register(LoadWeight, lambda task, ctx: None)
    assert child.find(LoadWeight) is not None  # later parent registrations show through


def test_only_task_classes_can_be_registered():
    with pytest.raises(TypeError, match="Task subclasses"):
        Executors().register(int, lambda task, ctx: None)
    with pytest.raises(TypeError):
        Executors().register(Compute("embed", 0), lambda task, ctx: None)


def test_global_decorator_registers_in_the_default_table():
    @dataclass(frozen=True, slots=True)
    class GlobalProbe(Task):
        tag: str

    @executor(GlobalProbe)
    def run_probe(task, ctx):
        return task.tag

    assert EXECUTORS.lookup(GlobalProbe) is run_probe
    assert EXECUTORS.child().lookup(GlobalProbe) is run_probe
