"""The study's findings: records, analysis and the reference claims, text, figures, a study read back."""
