"""Few-shot evaluation of trained initialisations: adaptation on shots, scoring, task-level statistics."""
