"""Presets as data: the reference study's grid and the `--preset` settings (torch-free, like `choices`)."""

from mnist_diff.choices import SAMPLERS, SCHEDULES

# The reference study: 4 schedules x 2 (T, beta_end) settings x 2 samplers. Its beta_start (1e-4), batch (128)
# and epochs (20) are `Config`'s defaults.
STUDY_SCHEDULES = SCHEDULES
STUDY_PAIRS = ((200, 0.08), (1000, 0.02))  # (T, beta_end)
STUDY_SAMPLERS = SAMPLERS

# The smoke preset: every grid point through the whole pipeline on CPU in minutes (tiny model, tiny FID).
SMOKE = {
    "epochs": 2,
    "batch_size": 32,
    "train_samples": 256,
    "channels": 8,
    "warmup_steps": 5,
    "fid_select_samples": 8,
    "fid_samples": 16,
    "fid_ref_samples": 32,
    "fid_batch_size": 64,
}
PRESETS = {"study": {}, "smoke": SMOKE}  # `--preset NAME`: the fields it sets where the user gave none
