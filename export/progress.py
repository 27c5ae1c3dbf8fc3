"""What an export shows while it runs, on stderr: its phases, each with its elapsed time, and a bar where it waits
on steps it can count; none of its libraries' chatter unless asked for (`gptserve export -v`).

On a terminal the current phase is a live tqdm bar that keeps its clock running through the long silent calls
(torch.onnx.export, the quantizer); elsewhere (a log file, docker logs, a test's pipe) each phase and step is one
plain line, written when it ends.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm

PREFIX = "[export]"
REFRESH_SECONDS = 0.5
STEPS_FORMAT = "{desc}: {elapsed} |{bar}| {n_fmt}/{total_fmt}{postfix}"
# Loggers of the libraries an export drives; at WARNING they print nothing an export user can act on (torch.onnx
# warns at length that torchvision is absent, a library the export never uses).
LIBRARY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir", "onnxruntime")


def quiet_libraries(verbose: bool) -> None:
    """Logging for an export run: our phases only, or (verbose) everything the libraries say, at INFO.
    Configures the root logger first, so that onnxruntime's quantizer, which calls logging.basicConfig(INFO) when
    imported, finds it configured and does not print its 800 INFO lines per model."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if verbose:
        return
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(torch|onnxscript|onnx_ir|onnxruntime)(\.|$)")
    # torch's pytree deprecation, which its stack level attributes to copyreg rather than to torch.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec")


class Steps:
    """The steps of one phase, reported as each ends."""

    def __init__(self, progress: Progress, name: str, bar: tqdm | None) -> None:
        self.progress, self.name, self.bar, self.done = progress, name, bar, 0
        self.started = time.perf_counter()

    def advance(self, label: str, total: int) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.bar_format = STEPS_FORMAT
            self.bar.total = total
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        else:
            self.progress.line(f"{self.name}: {label} ({self.done}/{total}, {self.progress.elapsed(self.started)})")


class Progress:
    def __init__(self, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live

    def line(self, message: str) -> None:
        print(f"{PREFIX} {message}", file=self.stream, flush=True)

    @staticmethod
    def elapsed(started: float) -> str:
        return f"{time.perf_counter() - started:.1f} s"

    @contextmanager
    def phase(self, name: str) -> Iterator[Steps]:
        """One phase: `with progress.phase("exporting") as steps:`; `steps.advance(label, total)` after each step
        of a phase that can count them. Its end line gives the time it took."""
        started = time.perf_counter()
        if not self.live:
            self.line(f"{name} ...")
            yield Steps(self, name, None)
            self.line(f"{name}: done in {self.elapsed(started)}")
            return
        bar = tqdm(desc=f"{PREFIX} {name}", file=self.stream, leave=False, dynamic_ncols=True,
                   bar_format="{desc}: {elapsed}")
        stop = threading.Event()

        def tick() -> None:  # the bar redraws only when told: this keeps its clock moving through silent calls
            while not stop.wait(REFRESH_SECONDS):
                bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield Steps(self, name, bar)
        finally:
            stop.set()
            ticker.join()
            bar.close()
        self.line(f"{name}: done in {self.elapsed(started)}")
