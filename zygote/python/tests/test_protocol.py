import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hatchery_zygote.protocol import (  # noqa: E402
    Failed,
    Fork,
    Forked,
    ProtocolError,
    Ready,
    Spare,
    format_message,
    parse_to_agent,
    parse_to_zygote,
    version_to_say,
)


class ProtocolTest(unittest.TestCase):
    def test_round_trip(self):
        for m in [Ready(1), Forked(7, 4242), Failed(9, "fork: out of memory"), Spare(4243)]:
            self.assertEqual(parse_to_agent(format_message(m)), m)
        self.assertEqual(format_message(Fork(3, 12)), b"FORK 3 12")
        self.assertEqual(parse_to_zygote(b"FORK 3 12"), Fork(3, 12))

    def test_same_text_as_the_rust_side(self):
        self.assertEqual(format_message(Ready()), b"READY 3")
        self.assertEqual(format_message(Spare(77)), b"SPARE 77")
        self.assertEqual(format_message(Forked(1, 99)), b"FORKED 1 99")
        self.assertEqual(
            format_message(Failed(1, "line one\nline\ttwo  \u00e9")), b"FAILED 1 line one line two"
        )
        self.assertEqual(format_message(Failed(2, " \n")), b"FAILED 2 unknown")
        long = format_message(Failed(1, "x " * 1000))
        self.assertLessEqual(len(long), 512)
        parse_to_agent(long)

    def test_malformed_messages_are_refused(self):
        for m in [
            b"", b"READY", b"READY 1 2", b"READY x", b"READY -1", b"READY +1", b"READY  1",
            b"READY 1 ", b" READY 1", b"ready 1", b"READY 1\n", b"FORKED 1", b"FORKED 1 0",
            b"FORKED 1 1", b"FORKED 1 -5", b"FORKED 1 99999999999", b"FORKED x 5", b"FAILED 1",
            b"FAILED x why", b"FAILED 1 caf\xc3\xa9", b"HELLO 1", b"FORK 1 2", b"SPARE",
            b"SPARE 1", b"SPARE 0", b"SPARE x", b"SPARE 5 6", b"SPARE -5",
            b"FAILED 1 " + b"x" * 512,
        ]:
            with self.assertRaises(ProtocolError, msg=repr(m)):
                parse_to_agent(m)
        for m in [
            b"", b"FORK", b"FORK 1", b"FORK 1 2 3", b"FORK -1 2", b"FORK 1 x",
            b"FORK 4294967296 1", b"FORK 1\x002", b"READY 1", b"FORK \xd9\xa1 2",
        ]:
            with self.assertRaises(ProtocolError, msg=repr(m)):
                parse_to_zygote(m)


    def test_the_version_said_is_the_lower_of_ours_and_the_agents(self):
        self.assertEqual(version_to_say({}), 2)
        self.assertEqual(version_to_say({"HATCHERY_ZYGOTE_PROTOCOL": "3"}), 3)
        self.assertEqual(version_to_say({"HATCHERY_ZYGOTE_PROTOCOL": "2"}), 2)
        self.assertEqual(version_to_say({"HATCHERY_ZYGOTE_PROTOCOL": "9"}), 3)
        self.assertEqual(version_to_say({"HATCHERY_ZYGOTE_PROTOCOL": "x"}), 2)


if __name__ == "__main__":
    unittest.main()
