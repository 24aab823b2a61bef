"""The diffusion math: beta schedules, the forward process, the DDPM and DDIM samplers, the UNet. Pure:
torch only, no tracking, study or CLI library."""
