"""Numbers behind a study's report: error bars, the scaling law, the popularity baseline."""
