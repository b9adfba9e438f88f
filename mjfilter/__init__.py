"""mjfilter: a milter-style plugin chain that gives your own MTA the control
headers of commercial transactional relays (Mailjet, MailerQ, SMTPeter, Maxemail).

Plugins write ``from mjfilter import hookimpl``.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("mjfilter")

__all__ = ["hookimpl", "__version__"]
