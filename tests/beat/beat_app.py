"""The app `stem beat` runs in the process tests (its broker: STEM_BROKER_URL)."""

import stem

app = stem.Stem("beat-e2e")
