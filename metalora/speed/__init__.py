"""Speed options that change how the method is computed, never what it computes (each has an equivalence test)."""
