#!/usr/bin/env python3
"""A fake IPMI 2.0 (lanplus / RMCP+) BMC on loopback, built on pyghmi.ipmi.bmc.Bmc.

The project's own copy of ../shared/recipes/fake_bmc.py, extended for the
baremetal tests: it keeps power state and the boot device (with its
"next boot only" flag), serves serial-over-LAN (echoes what the client types,
prints a fake boot log on power on / reset), and answers what a hardware
inventory reads: Get Device ID, Get System GUID, FRU 0 (chassis, board and
product areas) and an SDR repository with three sensors and their readings.

    python fake_bmc.py --port 6230 [--address 127.0.0.1]
        [--users admin:password | --users-env VAR] [--state-file st.json] [--serial SN]
        [--stock-rakp] [--busy N] [--delay-ms MS]

--stock-rakp   answer a SHA-256 RAKP proposal the way stock pyghmi servers
               (virtualbmc) do: "OK, suite 3 (SHA-1)", which breaks a client
               that does not fall back to SHA-1 itself.
--busy N       answer the first N chassis control commands with completion
               code 0xC0 ("node busy"), a transient error a client retries.
--delay-ms MS  take MS milliseconds over every command, one at a time, as a
               real BMC's firmware does (loopback alone answers in ~0.1 ms).

Run it as a subprocess (in a thread of the test process pyghmi deadlocks).
Every state change is printed as one JSON line on stdout (flushed) and, with
--state-file, written atomically to that file.  It prints {"event": "start"}
once it listens.
"""
import argparse
import json
import os
import signal
import struct
import sys
import time
import uuid

import pyghmi.ipmi.bmc as bmc
import pyghmi.ipmi.command as ipmicommand
import pyghmi.ipmi.private.serversession as serversession
import pyghmi.ipmi.private.session as ipmisession

# GOTCHA (pyghmi 1.6.x): the pyghmi *client* first proposes RAKP-HMAC-SHA256
# and pyghmi's *server* blindly answers "OK, suite 3 (SHA1)"; the client then
# crashes in _got_rakp2.  Unless --stock-rakp, reject non-SHA1 proposals with
# RMCP+ status 0x11 (invalid auth algorithm), as a real BMC would.
_orig_cosr = serversession.ServerSession.create_open_session_response
STOCK_RAKP = False


def _sha1_only_open_session_response(self, request):
    if not STOCK_RAKP and len(request) >= 32 and (request[12] != 1 or request[20] != 1):
        self.clientsessionid = request[4:8]
        return bytearray([request[0], 0x11, 0, 0]) + request[4:8]
    return _orig_cosr(self, request)


serversession.ServerSession.create_open_session_response = _sha1_only_open_session_response

# GOTCHA 2: pyghmi's server silently drops RAKP1 for an unknown user; real
# BMCs answer RAKP2 with status 0x0d "Unauthorized name".
_orig_rakp1 = serversession.ServerSession._got_rakp1


def _rakp1_reject_unknown_user(self, data):
    name = bytes(data[28:]).decode('utf-8', 'replace')
    if data[27] and self.authdata.get(name) is None:
        return self.send_payload(
            bytearray([data[0], 0x0d, 0, 0]) + self.clientsessionid,
            serversession.constants.payload_types['rakp2'], retry=False)
    return _orig_rakp1(self, data)


serversession.ServerSession._got_rakp1 = _rakp1_reject_unknown_user

# GOTCHA 3: a vanished SOL client makes ServerConsole call
# unregister_keepalive(), which crashes on a missing attribute.
serversession.ServerSession._customkeepalives = None


# ---- FRU and SDR images ------------------------------------------------------

def _tl(text):
    data = text.encode('latin-1')[:63]
    return bytes([0xC0 | len(data)]) + data


def _area(body):
    """A FRU area: version 1, length in 8-byte units, fields, 0xC1, pad, checksum."""
    data = bytearray([1, 0]) + body + b'\xc1'
    while (len(data) + 1) % 8:
        data.append(0)
    data[1] = (len(data) + 1) // 8
    data.append((-sum(data)) & 0xFF)
    return bytes(data)


def build_fru(serial):
    chassis = _area(bytes([0x17]) + _tl('CH-PART-1') + _tl('CH-' + serial))
    board = _area(bytes([0]) + b'\x00\x00\x00' + _tl('FakeBoards Inc')
                  + _tl('FB-1000 Mainboard') + _tl('BRD-' + serial) + _tl('FB-1000-A')
                  + _tl(''))
    product = _area(bytes([0]) + _tl('FakeVendor') + _tl('FakeServer 1U') + _tl('FS-1U-01')
                    + _tl('1.0') + _tl(serial) + _tl('ASSET-' + serial) + _tl(''))
    off = 1  # in 8-byte units, after the common header
    offsets = [off, off + len(chassis) // 8, off + (len(chassis) + len(board)) // 8]
    header = bytearray([1, 0, offsets[0], offsets[1], offsets[2], 0, 0])
    header.append((-sum(header)) & 0xFF)
    return bytes(header) + chassis + board + product


def _full_sensor(number, name, sensor_type, unit, m, thresholds=True):
    """A Full Sensor Record (SDR type 01h) of a linear, unsigned threshold sensor."""
    body = bytearray(43)
    body[0] = 0x20               # owner: the BMC
    body[1] = 0                  # LUN 0
    body[2] = number
    body[3] = 7                  # entity: system board
    body[4] = 1
    body[5] = 0x7F               # sensor initialization
    body[6] = 0x48 if thresholds else 0x40   # capabilities: readable thresholds
    body[7] = sensor_type
    body[8] = 0x01               # event/reading type: threshold
    body[15] = 0x00              # units 1: unsigned
    body[16] = unit
    body[17] = 0
    body[18] = 0                 # linear
    body[19] = m & 0xFF          # M (10 bits)
    body[20] = (m >> 2) & 0xC0   # M high bits, tolerance 0
    body[21] = 0                 # B
    body[22] = 0
    body[23] = 0
    body[24] = 0                 # R and B exponents
    name_b = name.encode()
    body[42] = 0xC0 | len(name_b)
    return bytes(body) + name_b


SENSORS = {
    # number: (name, type, unit, M, raw reading)
    1: ('CPU Temp', 0x01, 1, 1, 45),          # degrees C
    2: ('Inlet Temp', 0x01, 1, 1, 24),
    3: ('FAN1', 0x04, 18, 100, 54),           # RPM: 5400
}


def build_sdrs():
    records = []
    for recid, (number, (name, stype, unit, m, _)) in enumerate(sorted(SENSORS.items())):
        body = _full_sensor(number, name, stype, unit, m)
        records.append(struct.pack('<HBBB', recid, 0x51, 0x01, len(body)) + body)
    return records


class FakeBmc(bmc.Bmc):
    def __init__(self, authdata, port, address='127.0.0.1', state_file=None,
                 serial='SN0001', busy=0, delay=0.0):
        super().__init__(authdata, port=port, address=address)
        self._powerstate = 'off'
        self.bootdevice = 'default'
        self.boot_persistent = False
        self.state_file = state_file
        self.events = []
        self.pending_console = []
        self.busy = busy
        self.delay = delay
        self.serial = serial
        self.fru = build_fru(serial)
        self.sdrs = build_sdrs()
        self.guid = uuid.uuid5(uuid.NAMESPACE_DNS, 'fake-bmc-' + serial)
        self.deviceid = 0x20
        self.mfgid = 0xAAAA
        self.prodid = 0x01
        self.additionaldevices = 0x0A    # SDR repository and FRU inventory devices
        self._record('start')

    @property
    def powerstate(self):
        return self._powerstate

    @powerstate.setter
    def powerstate(self, value):
        self._powerstate = value

    # ---- helpers -------------------------------------------------------
    def _record(self, event, **kw):
        ev = dict(t=round(time.time(), 3), event=event, power=self.powerstate,
                  bootdev=self.bootdevice, persistent=self.boot_persistent, **kw)
        self.events.append(ev)
        print(json.dumps(ev), flush=True)
        if self.state_file:
            tmp = self.state_file + '.tmp'
            with open(tmp, 'w') as f:
                json.dump(dict(power=self.powerstate, bootdev=self.bootdevice,
                               persistent=self.boot_persistent, events=self.events), f)
            os.replace(tmp, self.state_file)

    def _boot_log(self):
        self.pending_console.append(
            b'\r\nFakeBIOS v1.0\r\nBooting from %s...\r\n' % self.bootdevice.encode())

    # ---- Bmc hooks -----------------------------------------------------
    def get_system_guid(self):
        return self.guid

    def get_boot_device(self):
        return self.bootdevice

    def set_boot_device(self, bootdevice):
        self.bootdevice = bootdevice
        self._record('set_bootdev')

    def cold_reset(self):
        self._record('bmc_cold_reset')
        return 0

    def get_power_state(self):
        return self.powerstate

    def power_off(self):
        self.powerstate = 'off'
        self._record('power_off')

    def power_on(self):
        self.powerstate = 'on'
        self._record('power_on')
        self._boot_log()

    def power_cycle(self):
        self.powerstate = 'on'
        self._record('power_cycle')
        self._boot_log()

    def power_reset(self):
        if self.powerstate != 'on':
            return 0xd5  # "command not supported in present state"
        self._record('power_reset')
        self._boot_log()

    def power_shutdown(self):
        self.powerstate = 'off'
        self._record('power_shutdown')

    def pulse_diag(self):
        self._record('pulse_diag')

    def is_active(self):      # SOL may only be activated when powered on
        return self.powerstate == 'on'

    def iohandler(self, data):  # bytes typed by the SOL client
        if isinstance(data, dict):
            self._record('sol_ctrl', data=str(data))
            return
        self._record('sol_in', data=data.decode('latin-1'))
        self.pending_console.append(data)  # echo (sent from serve_forever)

    def activate_payload(self, request, session):
        super().activate_payload(request, session)
        self._record('sol_activate', active=bool(self.sol))
        if self.sol:
            self.pending_console.append(b'fake-bmc SOL console ready\r\n')

    def deactivate_payload(self, request, session):
        super().deactivate_payload(request, session)
        self._record('sol_deactivate')

    # ---- boot options with the persistent flag ---------------------------
    def get_system_boot_options(self, request, session):
        if request['data'][0] == 5:
            dev = ipmicommand.boot_devices.get(self.bootdevice, 0)
            flags = 0 if self.bootdevice == 'default' else (
                0x80 | (0x40 if self.boot_persistent else 0))
            return session.send_ipmi_response(data=[1, 5, flags, dev, 0, 0, 0])
        return super().get_system_boot_options(request, session)

    def set_system_boot_options(self, request, session):
        if request['data'][0] == 5:
            self.boot_persistent = bool(request['data'][1] & 0x40)
        return super().set_system_boot_options(request, session)

    # ---- inventory: FRU, SDR, sensor readings ----------------------------
    def handle_raw_request(self, request, session):
        netfn, cmd, data = request['netfn'], request['command'], request['data']
        if self.delay:
            time.sleep(self.delay)   # a BMC's own processing time, one request at a time
        try:
            if netfn == 0 and cmd == 2 and self.busy > 0:
                self.busy -= 1
                self._record('busy')
                return session.send_ipmi_response(code=0xC0)
            if netfn == 0x0A and cmd == 0x10:        # Get FRU Inventory Area Info
                if data[0] != 0:
                    return session.send_ipmi_response(code=0xCB)
                return session.send_ipmi_response(
                    data=[len(self.fru) & 0xFF, len(self.fru) >> 8, 0])
            if netfn == 0x0A and cmd == 0x11:        # Read FRU Data
                fruid, offset, count = data[0], data[1] | (data[2] << 8), data[3]
                if fruid != 0:
                    return session.send_ipmi_response(code=0xCB)
                chunk = self.fru[offset:offset + min(count, 64)]
                return session.send_ipmi_response(data=[len(chunk)] + list(chunk))
            if netfn == 0x0A and cmd == 0x20:        # Get SDR Repository Info
                ts = list(struct.pack('<I', 1700000000))
                return session.send_ipmi_response(
                    data=[0x51, len(self.sdrs), 0, 0xFF, 0xFF] + ts + ts + [0x02])
            if netfn == 0x0A and cmd == 0x22:        # Reserve SDR Repository
                return session.send_ipmi_response(data=[1, 0])
            if netfn == 0x0A and cmd == 0x23:        # Get SDR
                recid = data[2] | (data[3] << 8)
                offset, size = data[4], data[5]
                if recid >= len(self.sdrs):
                    return session.send_ipmi_response(code=0xCB)
                rec = self.sdrs[recid]
                nxt = recid + 1 if recid + 1 < len(self.sdrs) else 0xFFFF
                part = rec[offset:] if size == 0xFF else rec[offset:offset + size]
                return session.send_ipmi_response(
                    data=[nxt & 0xFF, nxt >> 8] + list(part))
            if netfn == 0x04 and cmd == 0x2D:        # Get Sensor Reading
                sensor = SENSORS.get(data[0])
                if sensor is None:
                    return session.send_ipmi_response(code=0xCB)
                return session.send_ipmi_response(data=[sensor[4], 0x40, 0x00, 0x80])
        except Exception as e:  # never let one bad request kill the BMC
            self._record('error', error=repr(e))
            return session.send_ipmi_response(code=0xFF)
        return super().handle_raw_request(request, session)

    def serve_forever(self):
        while True:
            try:
                ipmisession.Session.wait_for_rsp(0.2)
                if self.sol is not None and self.sol.broken:
                    self._record('sol_lost')
                    self.sol, self.activated = None, False
                if self.sol and self.pending_console:
                    data = b''.join(self.pending_console)
                    self.pending_console = []
                    self.sol.send_data(data)
                elif not self.sol:
                    self.pending_console = []
            except Exception as e:  # never let one bad packet kill the BMC
                self._record('error', error=repr(e))


def main():
    global STOCK_RAKP
    p = argparse.ArgumentParser()
    p.add_argument('--port', type=int, default=6230)
    p.add_argument('--address', default='127.0.0.1')
    p.add_argument('--users', default='admin:password',
                   help='comma separated user:password list')
    p.add_argument('--users-env', help='read the user:password list from this environment '
                   'variable instead (keeps passwords out of argv)')
    p.add_argument('--state-file')
    p.add_argument('--serial', default='SN0001')
    p.add_argument('--stock-rakp', action='store_true')
    p.add_argument('--busy', type=int, default=0)
    p.add_argument('--delay-ms', type=float, default=0.0,
                   help='answer every IPMI command this much later (a real BMC takes '
                   'some milliseconds per command)')
    a = p.parse_args()
    STOCK_RAKP = a.stock_rakp
    users = dict(u.split(':', 1) for u in (os.environ[a.users_env] if a.users_env
                                          else a.users).split(','))
    b = FakeBmc(users, port=a.port, address=a.address, state_file=a.state_file,
                serial=a.serial, busy=a.busy, delay=a.delay_ms / 1000.0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    b.serve_forever()


if __name__ == '__main__':
    sys.exit(main())
