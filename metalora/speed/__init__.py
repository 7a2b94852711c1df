"""Speed options that change how the method is computed, not what (each has an equivalence test at lora.dropout=0)."""
