"""Reinjection: hand extra copies to the MTA's no-milter listener over SMTP (aiosmtplib)."""

from __future__ import annotations

import logging

import aiosmtplib

from .actions import Delivery
from .config import ReinjectConfig

log = logging.getLogger(__name__)


class ReinjectError(Exception):
    """A copy could not be handed over; the client must get a 4xx."""


async def reinject(deliveries: list[Delivery], cfg: ReinjectConfig) -> None:
    """Send every copy over one SMTP connection; raise ``ReinjectError`` on any failure.

    ``local_hostname`` is passed so aiosmtplib does no blocking name lookup.
    """
    if not deliveries:
        return
    smtp = aiosmtplib.SMTP(hostname=cfg.host, port=cfg.port, timeout=cfg.timeout,
                           local_hostname=cfg.local_hostname, start_tls=False, use_tls=False)
    try:
        await smtp.connect()
        for d in deliveries:
            errors, _ = await smtp.sendmail(d.sender, d.recipients, d.message.as_bytes())
            if errors:
                raise ReinjectError(f"reinjection refused recipients: {sorted(errors)}")
    except aiosmtplib.SMTPException as e:
        raise ReinjectError(f"reinjection to {cfg.host}:{cfg.port} failed: {e}") from e
    except OSError as e:
        raise ReinjectError(f"reinjection to {cfg.host}:{cfg.port} failed: {e}") from e
    finally:
        if smtp.is_connected:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()
