"""A tiny task for the experiments tests (imported in-process and by `ea ladder --import`).

"tiny_lag": random tokens over V symbols; from position `lag` on x_t = x_{t-lag} (scored), except
that 25% of those steps draw a fresh token instead (not scored).

`hang` makes every sample() call block until the process is interrupted: a run that cannot finish on
its own, for the Ctrl-C test (deterministic on any machine, however loaded). A path for `hang` is also
created when the blocking starts, so the test can send its signal to a run that is known to be blocked.

`fail` injects failures for the executor tests: "raise" (an exception in every run), "die" (the
process exits, as if its node were lost), "die-once:PATH" (exits once, then PATH exists and it runs)."""
import os
import time
from pathlib import Path

import torch

from expressive_attention.tasks import Task, register_task


@register_task("tiny_lag")
class TinyLag(Task):
    def __init__(self, lag: int = 1, V: int = 4, seq_len: int = 8, delay: float = 0.0, fail: str | None = None,
                 hang: bool | str = False):
        self.lag, self.V, self.seq_len, self.vocab_size = lag, V, seq_len, V
        self.delay = delay  # seconds of sleep per sample() call: runs that take time on any machine
        self.fail = fail
        self.hang = hang

    def params(self):
        extra = {"fail": self.fail} if self.fail else {}
        if self.hang:
            extra["hang"] = self.hang
        return {"lag": self.lag, "V": self.V, "seq_len": self.seq_len, "delay": self.delay, **extra}

    def describe(self):
        return f"tiny_lag lag={self.lag}"

    def _sample_raw(self, n, generator):
        if self.fail == "raise":
            raise RuntimeError("injected failure")
        if self.fail == "die" or (self.fail and self.fail.startswith("die-once:")
                                  and not Path(self.fail[len("die-once:"):]).exists()):
            if self.fail != "die":
                Path(self.fail[len("die-once:"):]).touch()
            os._exit(3)
        if isinstance(self.hang, str):
            Path(self.hang).touch()  # "blocked now"
        while self.hang:  # until Ctrl-C (KeyboardInterrupt) ends the process
            time.sleep(0.05)
        if self.delay:
            time.sleep(self.delay)
        x = torch.randint(0, self.V, (n, self.seq_len + 1), generator=generator)
        fresh = torch.rand(x.shape, generator=generator) < 0.25
        fresh[:, : self.lag] = True
        for t in range(self.lag, self.seq_len + 1):
            x[:, t] = torch.where(fresh[:, t], x[:, t], x[:, t - self.lag])
        return x, ~fresh


def tiny_preset(name="tiny", seeds=2, steps=6, delay=0.0, hang: bool | str = False):
    """Three rungs (lag 1, 2, 3) x DPA/EA x seeds. ``hang``: the runs of rungs 2 and 3 never finish (the grid is
    seed-major, rung, then kind: the first two runs, rung 1 of seed 0, finish; a sweep never ends by itself);
    a path: the task's `hang`, created when a run blocks."""
    from expressive_attention.experiments import Family, Preset
    return Preset(name=name, seeds=seeds,
                  base={"d_model": 16, "n_layers": 1, "n_heads": 2, "steps": steps, "warmup": 2,
                        "batch_size": 8, "eval_sequences": 32},
                  families={"tiny": Family("tiny_lag", [{"lag": k, "delay": delay, **({"hang": hang} if hang and k > 1 else {})}
                                                        for k in (1, 2, 3)],
                                           labels=["lag=1", "lag=2", "lag=3"])})
