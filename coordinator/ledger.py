"""Rounds aggregated but not yet written down (docs/round.md, pipelining).

Round r's evaluation and checkpoint run on the evaluator thread while the clients already train
round r+1; its metrics.jsonl line waits for them and for the follow-up reports of the clients whose
update was accepted. The :class:`RoundLedger` keeps those rounds in order, the accepted clients and
reports per task, and writes each line once everything it needs is in.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from safetensors import SafetensorError

from fedpara import load_state
from fedpara.runtime.checkpoint import save_checkpoint
from fedpara.runtime.messages import Report
from fedpara.runtime.rundir import RunDir
from fedpara.training import evaluate

from .observation import records
from .errors import RunFailed
from .events import RoundCompleted
from . import server_opt
from .strategy import FitResult

log = logging.getLogger("coordinator.server")


@dataclasses.dataclass
class PendingRound:
    """A round aggregated but not yet written down."""

    round: int
    tasks: dict[str, str]         # client -> the task id its result answered (one task in a sync round)
    fields: dict                  # everything records.round_row needs but the evaluation
    extra: dict                   # the line's other fields (screened, failures, privacy, wall_s, ...)
    results: list[FitResult]      # without tensors (metrics only)
    timing: dict
    socket: dict                  # the coordinator's kernel-counted socket bytes of the round
    job: tuple | None = None      # (state, evaluate?) until submitted
    future: Future | None = None  # -> (evaluation or None, eval_s, save_s); None: not submitted yet


class RoundLedger:
    def __init__(self, run_dir: RunDir, cfg, eval_model, test_data, *, personalised: bool,
                 ignored: Mapping[str, int], emit: Callable[[object], None]) -> None:
        self.run_dir, self.cfg, self.spec = run_dir, cfg, cfg.spec
        self.eval_model, self.test_data = eval_model, test_data
        self.personalised, self.ignored, self.emit = personalised, ignored, emit
        self.rows: list[dict] = []
        self.pending: list[PendingRound] = []
        self._accepted: dict[str, set[str]] = {}          # task id -> clients whose update was accepted
        self._reports: dict[str, dict[str, dict]] = {}    # task id -> client -> follow-up report
        self._evaluator: ThreadPoolExecutor | None = None
        self._server_opt: dict[int, tuple] = {}  # round -> the server optimiser's state after it

    # --- replies --------------------------------------------------------------------------------
    def accepted(self, task_id: str, client: str) -> None:
        self._accepted.setdefault(task_id, set()).add(client)

    def forget(self, task_id: str) -> None:
        """An attempt whose replies are not used (too few): its reports are not wanted."""
        self._accepted.pop(task_id, None)
        self._reports.pop(task_id, None)

    def report(self, client: str, rep: Report) -> str | None:
        """Keep a follow-up report for its round's line; returns the refusal counter otherwise: only
        from a client whose update for that task was accepted, once, while the line is unwritten."""
        if client not in self._accepted.get(rep.task_id, ()):
            return "stale"  # a task already written down, or a client that did not answer it
        got = self._reports.setdefault(rep.task_id, {})
        if client in got:
            return "duplicate"
        got[client] = rep.metrics
        return None

    # --- evaluation -----------------------------------------------------------------------------
    def start(self) -> None:
        self._evaluator = ThreadPoolExecutor(1, thread_name_prefix="evaluator")

    def stop(self) -> None:
        if self._evaluator is not None:
            self._evaluator.shutdown(wait=True)

    def add(self, p: PendingRound) -> None:
        """A round is aggregated; its evaluation is submitted by :meth:`submit` (once the next task
        is out: evaluating would slow its sending)."""
        self.pending.append(p)

    def keep_server_opt(self, rnd: int, opt: server_opt.ServerOptimizer) -> None:
        """The server optimiser's state after round ``rnd`` (a snapshot: its tensors are never
        changed in place), written with that round's checkpoint."""
        self._server_opt[rnd] = opt.state_dict()

    def resume_server_opt(self, opt: server_opt.ServerOptimizer, rnd: int) -> None:
        """Load the server optimiser's state after round ``rnd`` (ValueError naming the file)."""
        opt.load_state_dict(*server_opt.load_state(server_opt.state_path(self.run_dir.checkpoints, rnd)))

    def submit(self) -> None:
        for p in self.pending:
            if p.future is None:
                p.future = self._evaluator.submit(self._evaluate_and_save, p.round, *p.job,
                                                  self._server_opt.pop(p.round, None))
                p.job = None

    def _evaluate_and_save(self, rnd: int, state: dict, evaluate_now: bool,
                           opt_state: tuple | None = None) -> tuple[dict | None, float, float]:
        """Evaluator thread: the round's global model on the test data, then its checkpoint (and the
        server optimiser's state beside it, first: the checkpoint on disk says the round is saved)."""
        t0 = time.monotonic()
        ev = None
        if evaluate_now:
            load_state(self.eval_model, state)
            ev = evaluate(self.eval_model, self.test_data, batch_size=self.cfg.eval_batch_size)
        t1 = time.monotonic()
        if opt_state is not None:
            server_opt.save_state(server_opt.state_path(self.run_dir.checkpoints, rnd), *opt_state, round=rnd)
        save_checkpoint(self.run_dir.checkpoint(rnd), state, self.spec, round=rnd,
                        accuracy=None if ev is None else ev["accuracy"], run_id=self.cfg.run_id)
        return ev, t1 - t0, time.monotonic() - t1

    # --- lines ----------------------------------------------------------------------------------
    def reports_in(self, p: PendingRound) -> bool:
        return all(r.client_id in self._reports.get(p.tasks.get(r.client_id, ""), {})
                   for r in p.results if r.metrics.get("report_follows") is True)

    def ready(self) -> bool:
        """The oldest pending round can be written now."""
        p = self.pending[0] if self.pending else None
        return p is not None and p.future is not None and p.future.done() and self.reports_in(p)

    def finalize(self, block: bool = False, wait_reports: Callable[[PendingRound], None] | None = None) -> None:
        """Write the lines of the pending rounds whose evaluation is done (in order). ``block``: wait
        for the evaluations (``wait_reports(p)`` may first wait a while for a round's reports).
        Without it, only evaluated rounds whose reports are all in."""
        if block:
            self.submit()
        while self.pending:
            p = self.pending[0]
            if not block and not self.ready():
                return
            if wait_reports is not None and not self.reports_in(p):
                wait_reports(p)
            try:
                ev, eval_s, save_s = p.future.result()
            except (OSError, SafetensorError) as exc:  # a full disk, a read-only or vanished directory
                self.pending.clear()
                raise RunFailed(f"round {p.round}: cannot write the run directory {self.run_dir.root}: {exc}; "
                                "free space and --resume (no round is lost or repeated)", resumable=True) from None
            self.pending.pop(0)
            self._write(p, ev, eval_s, save_s)

    def _write(self, p: PendingRound, ev: dict | None, eval_s: float, save_s: float) -> None:
        reports: dict[str, dict] = {}
        for client, task_id in p.tasks.items():
            reports[client] = self._reports.get(task_id, {}).get(client, {})
        for task_id in set(p.tasks.values()):
            self._reports.pop(task_id, None)
            self._accepted.pop(task_id, None)
        results = [dataclasses.replace(r, metrics={**r.metrics, **reports.get(r.client_id, {})}) for r in p.results]
        row = records.round_row(**p.fields, evaluation=ev or {"accuracy": None, "loss": None}, results=results,
                               ignored=self.ignored, personalised=self.personalised)
        row.update(p.extra)
        row["timing"] = {**p.timing, "eval_s": eval_s, "save_s": save_s}
        row.update(p.socket)
        try:  # the checkpoint is on disk already: a resume redoes a round without its line
            self.run_dir.append_metrics(row)
        except OSError as exc:
            raise RunFailed(f"round {p.round}: cannot write the run directory {self.run_dir.root}: {exc}; "
                            "free space and --resume (no round is lost or repeated)", resumable=True) from None
        self.rows.append(row)
        self.emit(RoundCompleted(p.round, row))
