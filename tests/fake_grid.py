"""Flower's push/pull Grid interface for the tests' stand-in grids, which answer in send_and_receive,
and a stand-in Grid that delivers every message to hemex's real ClientApp in this process."""

from __future__ import annotations

from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.federation.settings import FederationSettings


class PushPullGrid:
    """Mixin: `push_messages` answers every message at once through the stand-in's
    `send_and_receive` and keeps the replies until `pull_messages` asks for them, as the server's
    reply collection (server/grid.py `collect_replies`) uses a real Grid."""

    def push_messages(self, messages):
        messages = list(messages)
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # what Flower's Grid does on push
        self._outbox = [*getattr(self, "_outbox", []), *self.send_and_receive(messages)]
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        outbox = getattr(self, "_outbox", [])
        self._outbox = [r for r in outbox if r.metadata.reply_to_message_id not in wanted]
        return [r for r in outbox if r.metadata.reply_to_message_id in wanted]


class AppGrid(PushPullGrid):
    """A stand-in Grid delivering each message to hemex's real ClientApp, one node per centre
    (partition order), each with its own persistent context state."""

    def __init__(self, settings: FederationSettings):
        self.settings = settings
        self.states: dict[int, RecordDict] = {}
        self.types: list[str] = []

    def get_node_ids(self):
        return list(range(1, len(self.settings.node_centers) + 1))

    def send_and_receive(self, messages, timeout=None):
        import client.app as client_app

        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.types.append(message.metadata.message_type)
            TaskIdentity.node_id = node
            context = Context(run_id=1, node_id=node, node_config={"partition-id": node - 1,
                                                                   "num-partitions": len(self.get_node_ids())},
                              state=self.states.setdefault(node, RecordDict()),
                              run_config=self.settings.to_run_config())
            replies.append(client_app.app(message, context))
        return replies
