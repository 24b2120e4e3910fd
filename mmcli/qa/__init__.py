"""Quality control: which images and results the model has no grounds for.

* :mod:`mmcli.qa.flags` the registry of flags (name, meaning, stage, whether it makes the label ``uncertain``);
* :mod:`mmcli.qa.image` checks on the pixels as read (numpy);
* :mod:`mmcli.qa.mask` lung-mask clean-up, the right/left split, mask checks and report cells (numpy);
* :mod:`mmcli.qa.ood` out-of-distribution statistics carried in the weights (torch);
* :mod:`mmcli.qa.policy` the ``--qa`` policy: a case's flags and what they do to its row.

Import the submodules themselves: this package imports nothing, so that reading images does not load torch.
"""
