"""The parent's progress bar while several sweep workers run: grid points complete, read from the study."""

from __future__ import annotations

from tqdm.auto import tqdm

from mnist_diff.study.spec import Sweep
from mnist_diff.study.storage import open_study, points_done

STUDY_BAR_SECONDS = 5  # how often the parent of several workers reads the study for its bar


class StudyBar:
    """The parent's bar while its workers run: grid points complete (read from the study) and trials running."""

    def __init__(self, sweep: Sweep):
        self.sweep, self.study = sweep, None
        self.bar = tqdm(
            total=sweep.size,
            desc=f"study {sweep.study_name}",
            unit="point",
            disable=not sweep.progress,
            dynamic_ncols=True,
        )
        self.update()

    def update(self) -> None:
        if self.bar.disable:
            return
        try:
            self.study = self.study or open_study(self.sweep)
            done, _ = points_done(self.study, self.sweep)
            running = sum(t.state.name == "RUNNING" for t in self.study.get_trials(deepcopy=False))
        except Exception:  # a bar is no reason to stop a study: the storage may be busy, try again later
            return
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix(running=running)

    def close(self) -> None:
        self.bar.close()
