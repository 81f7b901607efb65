"""Following the champion: poll ``champion/current.json``, load and smoke-test a new one, swap it in.

The engine in use is one attribute, read once per forward pass by the micro-batcher, so a swap
never interrupts a batch; the old engine is released only after a grace period, when no batch can
still hold it. A candidate that does not load or fails its smoke test is refused, logged and
counted, and the engine in use keeps serving; the same manifest is not tried again until it
changes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from distill_pipeline.core.published import Champion
from distill_pipeline.core.store import ObjectStore
from distill_pipeline.core.task import LabelSpec
from distill_pipeline.serving.students import Engine, Loaded, LoadSettings, SwapRefused, load_champion

log = logging.getLogger(__name__)

#: How long a swapped-out engine is kept for a batch that may still run on it.
RETIRE_AFTER_S = 60.0


@dataclass(frozen=True)
class Refusal:
    train_id: str
    reason: str
    at: float


def manifest_identity(manifest: dict) -> str:
    return json.dumps({k: manifest.get(k) for k in ("train_id", "adapter_prefix", "promoted_at")}, sort_keys=True)


class ChampionWatcher:
    """Keeps the current champion loaded; ``engine()`` is what serves now (None before the first)."""

    def __init__(
        self,
        store: ObjectStore,
        label: LabelSpec,
        settings: LoadSettings,
        *,
        poll_s: float = 30.0,
        on_swap: Callable[[str | None, Loaded], None] | None = None,
        on_refuse: Callable[[Refusal], None] | None = None,
    ) -> None:
        self.store = store
        self.label = label
        self.settings = settings
        self.poll_s = poll_s
        self.on_swap = on_swap
        self.on_refuse = on_refuse
        self.loaded: Loaded | None = None
        self.last_refusal: Refusal | None = None
        self.last_error: str | None = None
        self._tried: str | None = None  # identity of the last manifest tried, loaded or refused
        self._check_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def engine(self) -> Engine | None:
        loaded = self.loaded
        return None if loaded is None else loaded.engine

    @property
    def train_id(self) -> str | None:
        return None if self.loaded is None else self.loaded.engine.train_id

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="champion-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception as exc:  # a store outage: keep serving, try again at the next poll
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("could not read the champion from %s: %s", self.store.url, self.last_error)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def check(self, *, retry_refused: bool = False) -> str:
        """Look at the champion once; load and swap to it if it is new. Returns what happened."""
        with self._check_lock:
            manifest = Champion(self.store).current()
            self.last_error = None
            if manifest is None:
                return f"no champion in {self.store.url} yet"
            identity = manifest_identity(manifest)
            train_id = str(manifest.get("train_id"))
            if self.loaded is not None and manifest_identity(self.loaded.manifest) == identity:
                return f"serving {train_id} already"
            if identity == self._tried and not retry_refused:
                return f"{train_id} was refused: {self.last_refusal.reason if self.last_refusal else ''}"
            self._tried = identity
            log.info("loading the champion %s from %s", train_id, self.store.url)
            try:
                loaded = load_champion(self.store, manifest, self.label, self.settings)
            except SwapRefused as exc:
                refusal = Refusal(train_id, str(exc), time.time())
                self.last_refusal = refusal
                log.error("refused to swap to %s; still serving %s: %s", train_id, self.train_id, exc)
                if self.on_refuse is not None:
                    self.on_refuse(refusal)
                return f"refused {train_id}: {exc}"
            old = self.loaded
            self.loaded = loaded
            log.info("now serving %s (%s; loaded in %.1fs)", train_id, loaded.smoke.describe(), loaded.load_s)
            if self.on_swap is not None:
                self.on_swap(None if old is None else old.engine.train_id, loaded)
            if old is not None:
                retire = threading.Timer(RETIRE_AFTER_S, old.engine.close)
                retire.daemon = True
                retire.start()
            return f"swapped to {train_id}"

    def poll_now(self) -> None:
        self._wake.set()
