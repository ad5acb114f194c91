"""Models written the way users write them (TRM / HRM references, RNN cells, conv refiners,
looped and Hugging Face transformers), and the issue-14 "Must show" tests on them."""
