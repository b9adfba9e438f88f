"""Front ends: the only code that knows an MTA (milter, replay; later smtp, socketmap)."""
