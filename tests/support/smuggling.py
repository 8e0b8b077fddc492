"""The SMTP smuggling lookalike terminators shared by the tests (security notes 1.4)."""

#: V1-V15 must never end DATA; V16, ``\r\n.\r\n``, is the real terminator.
LOOKALIKES: dict[str, bytes] = {
    "V1": b"\n.\n",
    "V2": b"\n.\r\n",
    "V3": b"\r.\r",
    "V4": b"\r.\n",
    "V5": b"\n.\r",
    "V6": b"\r.\r\n",
    "V7": b"\r\n.\n",
    "V8": b"\r\n.\r",
    "V9": b"\r\n.\r\r\n",
    "V10": b"\r\r\n.\r\r\n",
    "V11": b"\r\n\x00.\r\n",
    "V12": b"\r\n.\x00\r\n",
    "V13": b"\n\n.\r\n",
    "V14": b"\r\n. \r\n",
    "V15": b"\r\n..\r\n",
}
