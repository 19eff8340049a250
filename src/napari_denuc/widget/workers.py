"""Background jobs: one worker at a time, progress, Cancel, and errors shown to the user."""

from __future__ import annotations

from napari.qt.threading import create_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal

from ..errors import DenucError
from .native import prepare_for_torch


class Cancelled(Exception):
    """Raised inside a worker when the user pressed Cancel."""


class ProgressRelay(QObject):
    """Carries progress from worker threads to the GUI thread (queued signal)."""

    progress = Signal(int, int)


class WorkersMixin:
    """Methods of :class:`DenucWidget` for this job; the widget holds the state (its ``__init__``)."""

    def _progress_cb(self, done, total):
        if self._cancel.is_set():
            raise Cancelled()
        self._relay.progress.emit(int(done), int(max(total, 1)))

    def _start_worker(self, fn, on_done, title, on_cancelled=None):
        prepare_for_torch()
        self._cancel.clear()
        for b in (self.run_btn, self.retrain_btn, self.bundled_btn):
            b.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        if not self._loading:
            self.progress_bar.setValue(0)
        self._set_status(title + "…")
        self._napari_progress = napari_progress(total=100, desc=title)

        def guarded():  # errors come back as values: napari would re-raise errored workers
            try:
                return True, fn()
            except Exception as exc:  # noqa: BLE001 (reported to the user by _on_worker_error)
                return False, exc

        def returned(result):
            ok, value = result
            if self._retired:  # the dock was closed meanwhile: the layers answer to the open widget now
                if ok and on_cancelled is not None:  # e.g. a head trained for a dock no longer there
                    on_cancelled(value)
                return
            if ok and self._cancel.is_set():  # Cancel pressed after the last progress step: still cancelled
                if on_cancelled is not None:
                    on_cancelled(value)
                ok, value = False, Cancelled()
            if not ok:
                self._on_worker_error(value)
                return
            try:
                on_done(value)
            except Exception as exc:  # noqa: BLE001
                self._on_worker_error(exc)

        w = create_worker(guarded)
        w.returned.connect(returned)
        w.finished.connect(self._on_worker_finished)
        self._worker = w
        w.start()

    def _on_progress(self, done, total):
        if self._loading:
            self._end_loading()
        pct = int(100 * done / max(total, 1))
        self.progress_bar.setValue(pct)
        if self._napari_progress is not None:
            self._napari_progress.n = pct
            self._napari_progress.refresh()

    def cancel(self):
        """Stop the running job at its next progress step; nothing already saved is touched."""
        self._cancel.set()
        self._set_status("Cancelling…")

    def _on_worker_error(self, exc):
        if isinstance(exc, Cancelled):
            self._set_status("Cancelled. Your nuclei and head are unchanged.")
        elif isinstance(exc, DenucError):
            self._set_status(str(exc))
            show_error(str(exc))
        else:
            self._set_status(f"Failed: {type(exc).__name__}: {exc}. Your nuclei and head are unchanged.")
            show_error(f"DeNuC failed: {type(exc).__name__}: {exc}")
        self.last_error = exc

    def _on_worker_finished(self):
        self._worker = None
        for b in (self.run_btn, self.retrain_btn, self.bundled_btn):
            b.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        if self._napari_progress is not None:
            self._napari_progress.close()
            self._napari_progress = None

    def is_busy(self) -> bool:
        return self._worker is not None
