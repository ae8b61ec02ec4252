"""The ledger under the garbage collector (issue #17, item 3).

A model's entry is removed by a weakref finalizer. The cyclic GC runs finalizers and `__del__` methods at any
allocation, so also while a ledger call holds the lock on the same thread (plan() -> others/reserve, the
streamer's accounting update): a finalizer that took the lock waited for its own thread, and ComfyUI's executor
hung for good. Every test runs the ledger in a worker thread with a timeout, so a regression fails instead of
hanging CI.
"""

import gc
import sys
import threading

import pytest

from distorch import ledger as ledger_module
from distorch.ledger import Holding, Ledger

TIMEOUT_S = 30.0


class Model:
    """A stand-in model in a reference cycle: only the cyclic GC frees it."""

    def __init__(self, name: str):
        self.name = name
        self.cycle = self


class CallsTheLedger:
    """Garbage in a cycle whose `__del__` uses the ledger, as a model wrapper that closes its stream does."""

    def __init__(self, ledger: Ledger, model: Model, errors: list):
        self.ledger, self.model, self.errors = ledger, model, errors
        self.cycle = self

    def __del__(self):
        try:
            self.ledger.others(self.model)
            account = self.ledger.account(self.model)
            if account is not None:
                account.update(pinned=account.holding.pinned)
        except Exception as error:  # noqa: BLE001  (an exception in __del__ is only printed; keep it)
            self.errors.append(error)


class CollectInsideTheLedger:
    """While active, every line the ledger executes first frees one more reserved model (left in a cycle) and one
    `CallsTheLedger`, then runs gc.collect(): the collection lands inside every ledger method, lock held."""

    def __init__(self, ledger: Ledger, doomed: list[Model], errors: list):
        self.ledger, self.doomed, self.errors = ledger, doomed, errors
        self.collections = 0

    def __enter__(self):
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)

    def _call(self, frame, event, arg):
        return self._line if frame.f_code.co_filename == ledger_module.__file__ else None

    def _line(self, frame, event, arg):
        if event == "line":
            model = self.doomed.pop() if self.doomed else None
            CallsTheLedger(self.ledger, model, self.errors)
            del model  # only its cycle holds it now
            gc.collect()
            self.collections += 1
        return self._line


def run_with_timeout(body) -> object:
    result, failure = [], []

    def worker():
        try:
            result.append(body())
        except BaseException as error:  # noqa: BLE001  (reported in the test's thread)
            failure.append(error)

    thread = threading.Thread(target=worker, daemon=True, name="ledger-under-gc")
    thread.start()
    thread.join(TIMEOUT_S)
    if thread.is_alive():
        pytest.fail(f"the ledger hung: a collection inside a ledger call did not return within {TIMEOUT_S:.0f} s")
    if failure:
        raise failure[0]
    return result[0]


@pytest.fixture
def quiet_collector():
    """Collections happen only where the test runs them; what existed before is frozen out of them (fast)."""
    gc.collect()
    gc.disable()
    gc.freeze()
    yield
    gc.unfreeze()
    gc.enable()


def test_a_collection_inside_every_ledger_call_neither_hangs_nor_corrupts(quiet_collector):
    """At every line of reserve/account/update/holding/others/release, a model in a reference cycle is freed by
    gc.collect() and an object whose __del__ calls the ledger is collected. With the lock taken by the finalizer
    (main) the worker hangs at the first line; with a plain lock the __del__ does; with a re-entrant lock but
    finalizers that remove the entry directly, others() iterates the dict as it changes size."""
    ledger, errors = Ledger(), []
    live = [Model(f"live {i}") for i in range(3)]
    doomed = [Model(f"doomed {i}") for i in range(400)]

    def body():
        for model in doomed:
            ledger.reserve(model, Holding(model.name, pageable=1))
        with CollectInsideTheLedger(ledger, doomed, errors) as collector:
            for round_ in range(2):
                for index, model in enumerate(live):
                    ledger.reserve(model, Holding(model.name, pageable=10 + index))
                ledger.others(live[0])
                ledger.account(live[1]).update(pinned=5 + round_, staged=True)
                assert ledger.account(live[1]).holding.pinned == 5 + round_
                ledger.release(live[2])
                ledger.holdings()
        doomed.clear()
        gc.collect()
        return collector.collections, ledger.holdings()

    collections, holdings = run_with_timeout(body)
    assert not errors, errors
    assert collections >= 50, "the collections must land inside the ledger's methods"
    assert holdings == (Holding("live 0", pageable=10), Holding("live 1", pageable=11, pinned=6, staged=True))
    assert not ledger._freed and set(ledger._finalizers) == set(ledger._entries)


class Plain:
    """A model freed by reference counting alone; the next one of its size usually takes its address."""

    __slots__ = ("__weakref__",)


def test_an_entry_of_a_freed_model_never_answers_for_a_new_model_at_its_address():
    """A finalizer only queues the freed key; a model allocated at the freed one's address (the same id) must
    neither inherit the old entry nor go without a finalizer of its own."""
    ledger, reused = Ledger(), 0
    for _ in range(100):
        model = Plain()
        ledger.reserve(model, Holding("old", pageable=1))
        old_id = id(model)
        del model
        successor = Plain()
        if id(successor) == old_id:
            reused += 1
            if reused % 2:  # every other time reserve() is the first call after the old model died
                assert ledger.account(successor) is None
            ledger.reserve(successor, Holding("new"))
            assert ledger.holdings() == (Holding("new"),)
        del successor
        assert ledger.holdings() == ()
    assert reused, "CPython gives a freed object's memory to the next object of its size"
