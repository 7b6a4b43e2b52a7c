"""etrn: answer ETRN (RFC 1985) cleanly: this server keeps no queue to start for a client.

A client that holds mail for a node (a backup MX's customer) may say ``ETRN node`` to ask
that the queue for it be flushed. qpgevent receives mail and hands it on at once, so
there is never a queue to start: this plugin offers ETRN in the EHLO reply and answers
each request with RFC 1985's ``458 Unable to queue messages for node`` (a temporary
reply: the client tries its other ways), or ``501`` when the node is missing. Without
it, ETRN is an unknown command (500, RFC 5321 4.2.4), which some clients log as a protocol
error. ``HELP ETRN`` says what it does (its ``help_texts``).

An example of a verb added by a plugin, end to end: it declares ``verbs``,
``ehlo_keywords`` and ``help_texts`` and answers in ``hook_command``.

Example::

    [[etrn]]
"""

from qpgevent.plugin import DECLINED, DENY, DENYSOFT, Plugin


class Etrn(Plugin):
    verbs = ("ETRN",)
    ehlo_keywords = ("ETRN",)
    help_texts = {"ETRN": "ETRN <node>: ask to flush the queue held for node (RFC 1985); "
                          "this server keeps none: 458"}

    def hook_command(self, session, verb, argument):
        if verb != "ETRN":
            return DECLINED
        node = argument.strip()
        if not node or " " in node:
            return DENY, "501 5.5.4 Syntax: ETRN [@|#]node"
        return DENYSOFT, f"458 4.3.0 Unable to queue messages for node {node}: this server keeps no queue"
