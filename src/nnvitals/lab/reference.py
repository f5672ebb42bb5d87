"""The lesson notebook's figures on names.txt, shown beside the lab's own when the data is that file.

Step-0 losses and saturation were measured with the lesson's seeding on the first minibatch; final
losses are the notebook's loss log after 200,000 steps (train and val over the whole splits). The
notebook stopped its deep network after about 1,000 steps, so it has no final figures for it.
"""

from __future__ import annotations

from typing import Any

REFERENCE: dict[str, dict[str, Any]] = {
    "naive": {"start_loss_batch": 27.8817, "start_loss_train": 26.00, "saturation_init": 0.685,
              "train_loss": 2.1245, "val_loss": 2.1682},
    "fix-softmax": {"start_loss_batch": 3.3221, "saturation_init": 0.685, "train_loss": 2.07, "val_loss": 2.13},
    "fix-tanh": {"start_loss_batch": 3.3135, "saturation_init": 0.035, "train_loss": 2.0356, "val_loss": 2.1027},
    "kaiming": {"start_loss_batch": 3.3179, "saturation_init": 0.168, "train_loss": 2.0377, "val_loss": 2.1070},
    # The loss log's BatchNorm figures use statistics calibrated over the training split; evaluated
    # with the running statistics the notebook printed train 2.0674, val 2.1057.
    "batchnorm": {"train_loss_calibrated": 2.0668, "val_loss_calibrated": 2.1048,
                  "train_loss": 2.0674, "val_loss": 2.1057},
    "deep": {"start_loss_batch": 3.2870},
}
EXAMPLES = {"train": 182_625, "val": 22_655, "test": 22_866}
SOURCE = "karpathy/nn-zero-to-hero, lectures/makemore/makemore_part3_bn.ipynb"


def for_stage(name: str) -> dict[str, Any]:
    return dict(REFERENCE.get(name, {}))
