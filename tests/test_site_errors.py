"""Nothing identifying leaves a site in an error: a handler's exception reaches the coordinator as
its class, a short code and a salted digest; the full text stays in the site's log."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from client.errors import SALT_KEY, site_errors
from common.data.io import read_ct
from server.grid import StageGrid, error_summary
from common.files import write_json

pytestmark = pytest.mark.usefixtures("task_identity")
PATIENT_ID = "PAT-4711"
STUDY_DATE = "20240102"


@pytest.fixture
def site_log():
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect()
    logger = logging.getLogger("hemex.site")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def call(app: ClientApp, message_type: str, context: Context) -> tuple[Message, Message]:
    TaskIdentity.node_id = context.node_id
    message = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=context.node_id, message_type=message_type)
    return message, app(message, context)


def context_for(node_config: dict, run_config: dict | None = None, node_id: int = 7) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config=run_config or {})


def corrupt_scan_app(tmp_path) -> tuple[ClientApp, str]:
    """A ClientApp whose train handler reads a corrupt scan in a folder named by a PatientID and
    study date, as exported by a PACS: hemex's DataError names that path."""
    folder = tmp_path / f"{PATIENT_ID}_{STUDY_DATE}"
    folder.mkdir()
    scan = folder / "ct.nii.gz"
    scan.write_bytes(b"not a nifti file at all")
    app = ClientApp(mods=[site_errors])

    @app.train("seg")
    def train(message, context):
        read_ct(scan)

    return app, str(scan)


def test_a_handler_error_leaves_the_site_as_class_code_and_digest(tmp_path, site_log):
    app, scan = corrupt_scan_app(tmp_path)
    context = context_for({"center": "center1"})
    message, reply = call(app, "train.seg", context)
    assert reply.has_error() and reply.metadata.reply_to_message_id == message.metadata.message_id
    reason = reply.error.reason
    assert "\n" not in reason and PATIENT_ID not in reason and STUDY_DATE not in reason and str(tmp_path) not in reason
    assert reason.startswith("DataError: site error in train.seg at io.py:")
    # The digest is SHA-256 of the full text under the run's salt, which never leaves the site.
    full = str(pytest.raises(Exception, read_ct, tmp_path / f"{PATIENT_ID}_{STUDY_DATE}" / "ct.nii.gz").value)
    assert scan in full and PATIENT_ID in full
    salt = context.state[SALT_KEY]["salt"]
    expected = hashlib.sha256(f"{salt}\nDataError: {full}".encode()).hexdigest()[:12]
    assert f"digest {expected} " in reason
    assert hashlib.sha256(f"DataError: {full}".encode()).hexdigest()[:12] not in reason  # salted
    # The site's log keeps the full text (with the traceback) under the same digest.
    assert len(site_log) == 1 and expected in site_log[0].getMessage() and scan in site_log[0].getMessage()
    assert "Traceback" in site_log[0].getMessage()

    # What the coordinator files in federation.json: the same line, nothing more.
    grid = StageGrid(grid=None, node_centers={context.node_id: "center1"}, action="seg")
    grid._record([message], [reply], wall_s=1.0)
    assert grid.rounds["train.seg"][0]["errors"] == {"center1": reason}
    assert error_summary(reason) == reason
    write_json(tmp_path / "federation.json", {"rounds": grid.rounds})
    stored = (tmp_path / "federation.json").read_text(encoding="utf-8")
    assert PATIENT_ID not in stored and STUDY_DATE not in stored and "ct.nii.gz" not in stored


def test_one_run_gives_one_digest_per_error_and_another_run_another(tmp_path, site_log):
    app, _ = corrupt_scan_app(tmp_path)
    context = context_for({})
    first, again = call(app, "train.seg", context)[1], call(app, "train.seg", context)[1]
    other_run = call(app, "train.seg", context_for({}))[1]
    digest = first.error.reason.split("digest ")[1][:12]
    assert again.error.reason == first.error.reason  # the coordinator can tell a repeated error
    assert digest not in other_run.error.reason  # but cannot link runs (fresh salt)
    assert len(site_log) == 3


def test_the_real_client_app_sanitizes_a_site_set_up_error(tmp_path, site_log):
    """hemex's own ClientApp: a SuperNode configured with a data path named by a patient."""
    import client.app as client_app

    missing = tmp_path / f"{PATIENT_ID}^DOE^JANE"
    context = context_for({"center": "center1", "data-path": str(missing)})
    _, reply = call(client_app.app, "query.info", context)
    reason = reply.error.reason
    assert reason.startswith("ConfigError: site error in query.info at site.py:")
    assert PATIENT_ID not in reason and "DOE" not in reason and str(tmp_path) not in reason
    assert str(missing) in site_log[0].getMessage()
    json.dumps(reason)  # a plain string, filed as is
