"""The makemore part 3 experiment, stage by stage: `nnvitals lab`.

data        the word list (a file, the fetched names.txt, or the embedded census names), its vocabulary
            and the lesson's 80/10/10 split
models      one module per stage, weights drawn in the lesson's order; the hand-written BatchNorm
train       plain SGD with checkpoints that resume to the very same numbers
diagnose    the doctor's check and Monitor applied to a stage
experiment  one stage from initialisation to samples, and the whole run (in parallel worker processes)
report      summary.json (its fields are documented there), loss.png and report.html
reference   the notebook's figures on names.txt
cli         the `lab` and `data` commands
"""
