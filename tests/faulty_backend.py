"""The one backend double of the tests: the real MLX backend, with the faults a test switches on.

Serve with it through the test kit's ``backend=``::

    faults = Faults()
    with test_client(model, backend=faults.backend) as client: ...

Generation is real (mlx-lm's batch engine on the loaded model); only these faults are added:

- a prompt holding ``ADD_FAULT`` is refused by the engine as it joins the batch (``add`` raises);
- while ``faults.step_fault`` is set, every engine step whose batch holds a prompt with ``STEP_FAULT``
  raises, as a device error in the middle of a batch would. It is set from the start unless the
  plugin is made with ``step_fault=False``, so a test can first line up the batch and the queue;
- a prompt holding ``ROW_FAULT`` gets a logits processor of its own that raises while ``faults.row_fault``
  is set, as a request's own processing (a grammar, a penalty) might, inside the batch's shared step;
- removing a sequence whose prompt holds ``REMOVE_FAULT`` from the batch (a stop string reached, a
  client gone) raises;
- while ``faults.close_fault`` is set, closing an engine (a model swap, shutdown) raises;
- while ``faults.load_gate`` is clear, a load waits for it (status shows it waiting);
- with ``Faults(batchable=False)``, models are served one sequence at a time, as models whose KV
  cache cannot be merged are.
"""

from __future__ import annotations

import threading

from forgellm import Backend, Engine, LoadedModel, Settings
from forgellm.backends.mlx import MlxBackend

ADD_FAULT = "[fault: refuse to start]"
STEP_FAULT = "[fault: break the batch]"
REMOVE_FAULT = "[fault: cannot be removed]"
ROW_FAULT = "[fault: break this row]"
ROW_FAULT_MESSAGE = "injected fault: this row's logits processor failed"
ADD_FAULT_MESSAGE = "injected fault: the engine refused the sequence"
STEP_FAULT_MESSAGE = "injected fault: the device failed mid-batch"
REMOVE_FAULT_MESSAGE = "injected fault: the engine could not remove the sequence"
CLOSE_FAULT_MESSAGE = "injected fault: the engine could not be closed"


class FaultyEngine(Engine):
    def __init__(self, engine: Engine, faults: Faults) -> None:
        self._engine = engine
        self._plugin = faults
        self._breakers: set[int] = set()
        self._unremovable: set[int] = set()

    def add(self, seq_id, job):
        if ADD_FAULT in job.prompt_text:
            raise RuntimeError(ADD_FAULT_MESSAGE)
        if STEP_FAULT in job.prompt_text:
            self._breakers.add(seq_id)
        if REMOVE_FAULT in job.prompt_text:
            self._unremovable.add(seq_id)
        return self._engine.add(seq_id, job)

    def step(self):
        if self._breakers and self._plugin.step_fault.is_set():
            raise RuntimeError(STEP_FAULT_MESSAGE)
        return self._engine.step()

    def remove(self, seq_ids):
        seq_ids = list(seq_ids)
        if self._unremovable.intersection(seq_ids):
            raise RuntimeError(REMOVE_FAULT_MESSAGE)
        self._breakers.difference_update(seq_ids)
        self._engine.remove(seq_ids)

    def __len__(self):
        return len(self._engine)

    def close(self):
        if self._plugin.close_fault.is_set():
            raise RuntimeError(CLOSE_FAULT_MESSAGE)
        self._engine.close()

    def cache_bytes(self):
        return self._engine.cache_bytes()


def _with_row_fault(processors_of, row_fault: threading.Event):
    """The model's processors for a job, plus, for a ROW_FAULT prompt, one that fails while row_fault is set."""

    def processors(job):
        found = processors_of(job)
        if ROW_FAULT in job.prompt_text:

            def fail_when_told(tokens, logits):
                if row_fault.is_set():
                    raise RuntimeError(ROW_FAULT_MESSAGE)
                return logits

            found.append(fail_when_told)
        return found

    return processors


def _with_faulty_engines(model: LoadedModel, faults: Faults) -> LoadedModel:
    """The loaded MLX model, whose engines are wrapped."""
    create_engine = model.create_engine
    model.create_engine = lambda max_batch_size: FaultyEngine(create_engine(max_batch_size), faults)  # type: ignore[method-assign]
    return model


class FaultyBackend(Backend):
    def __init__(self, mlx: MlxBackend, faults: Faults) -> None:
        self._mlx = mlx
        self._faults = faults
        self.default_model = mlx.default_model

    def describe_source(self, name):
        return self._mlx.describe_source(name)

    def load(self, model_name, adapter_path, progress=print):
        if not self._faults.load_gate.is_set():
            progress("waiting for the test's gate")  # status shows it while the load runs
            if not self._faults.load_gate.wait(timeout=60):
                raise TimeoutError("the test never opened the load gate")
        model = self._mlx.load(model_name, adapter_path, progress)
        model.decoding.processors = _with_row_fault(model.decoding.processors, self._faults.row_fault)
        if not self._faults.batchable:
            model.batchable = False
        return _with_faulty_engines(model, self._faults)


class Faults:
    """The switches of one FaultyBackend; ``backend`` is what the test kit's ``backend=`` takes."""

    def __init__(self, *, step_fault: bool = True, batchable: bool = True) -> None:
        self.step_fault = threading.Event()
        if step_fault:
            self.step_fault.set()
        self.close_fault = threading.Event()
        self.row_fault = threading.Event()
        self.load_gate = threading.Event()
        self.load_gate.set()
        self.batchable = batchable

    def backend(self, settings: Settings) -> FaultyBackend:
        return FaultyBackend(MlxBackend.from_settings(settings), self)
