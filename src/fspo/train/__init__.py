"""Training: SFT (few-shot Pref-FT) and FSPO (IPO/DPO) on one accelerate loop."""
