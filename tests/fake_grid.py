"""Flower's push/pull Grid interface for the tests' stand-in grids, which answer in send_and_receive."""

from __future__ import annotations


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
