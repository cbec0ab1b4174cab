"""The fork server's first preload (serving.warm_start): it and each run forked from it die with
`runbooks up` (see serving.lifetime), and write their stacks on SIGUSR1 like every process of ours.
Importing a module is the only hook multiprocessing gives into the fork server, hence the effect at
import; nothing else imports this module."""

import signal

from serving.lifetime import die_with_parent, stacks_on_sigusr1, tie_forks_to_parent

die_with_parent(signal.SIGKILL)
tie_forks_to_parent()
stacks_on_sigusr1()
