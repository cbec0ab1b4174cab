"""Field types the blocks share."""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, SecretStr, WithJsonSchema

# An optional secret, shown in Prefect's block form as a masked password input. Pydantic's schema
# of `SecretStr | None` is anyOf[password string, null]: the UI draws that as two tabs,
# "password" and "None", with None selected, where Prefect's own secrets (a SlackWebhook's URL)
# get the masked input straight away; the legacy UI draws a plain textarea. One flat password
# string renders as that input. Left empty, the UI leaves the field out and the default (None)
# applies. Prefect still finds the field a secret (its `secret_fields`) from the annotation.
OptionalSecretStr = Annotated[
    SecretStr | None,
    WithJsonSchema({"type": "string", "format": "password", "writeOnly": True}),
]

# Every block's config: pydantic's errors otherwise repeat the input, e.g. "basic auth needs both
# username and password [input_value={'password': 'hunter2'}]", and flows log such errors when
# a saved block no longer validates. A nested block's secrets are in its parent's input too.
BLOCK_CONFIG = ConfigDict(hide_input_in_errors=True)
