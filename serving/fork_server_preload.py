"""The fork server's first preload (serving.warm_start): it and each run forked from it die with
`runbooks up` (see serving.lifetime). Importing a module is the only hook multiprocessing gives
into the fork server, hence the effect at import; nothing else imports this module."""

import signal

from serving.lifetime import die_with_parent, tie_forks_to_parent

die_with_parent(signal.SIGKILL)
tie_forks_to_parent()
