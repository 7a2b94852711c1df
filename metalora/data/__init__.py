"""Task suites and what is drawn from them: the task format, the embedded suite, splits, episodes, collation."""
