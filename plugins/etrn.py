"""etrn: answer ETRN (RFC 1985) cleanly: this server keeps no queue to start for a client.

A client that holds mail for a node (a backup MX's customer) may say ``ETRN node`` to ask
that the queue for it be flushed. qpgevent receives mail and hands it on at once, so
there is never a queue to start: this plugin offers ETRN in the EHLO reply and answers
each request with RFC 1985's ``458 Unable to queue messages for node`` (a temporary
reply: the client tries its other ways), or ``501`` when the node is missing. Without
it, ETRN is an unknown command (500), which some clients log as a protocol error.

An example of a verb added by a plugin, end to end: it declares ``verbs`` and
``ehlo_keywords`` and answers in ``hook_command``.

Example::

    [[etrn]]
"""

from qpgevent.plugin import DECLINED, DENY, DENYSOFT, Plugin


class Etrn(Plugin):
    verbs = ("ETRN",)
    ehlo_keywords = ("ETRN",)

    def hook_command(self, session, verb, argument):
        if verb != "ETRN":
            return DECLINED
        node = argument.strip()
        if not node or " " in node:
            return DENY, "501 5.5.4 Syntax: ETRN [@|#]node"
        return DENYSOFT, f"458 4.3.0 Unable to queue messages for node {node}: this server keeps no queue"
