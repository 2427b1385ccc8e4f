// NBD over TLS: the server's STARTTLS rules and checks, and the nbd driver's client side, with real qemu-img/qemu-io/qemu-nbd peers.
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import type { Daemon } from '../../../src/daemon.js';
import { BlockNode } from '../../../src/block/node.js';
import { fileDriver } from '../../../src/block/file.js';
import { nbdDriver } from '../../../src/block/nbd-client/index.js';
import { nbdExportDriver, type NbdExport } from '../../../src/exports/nbd.js';
import { nbdServerRunning, nbdServerStart, nbdServerStop } from '../../../src/nbd/server.js';
import { objectAdd } from '../../../src/qmp/commands/qom.js';
import * as abi from '../../../src/nbd/nbd-abi.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;

/** A CA, a server certificate for localhost and a client certificate (DN O=qsd-ts,CN=qsd-client), in QEMU's layout. */
async function makePki(dir: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  const cnf = (name: string, body: string) => fs.writeFileSync(path.join(dir, name), body);
  cnf('ca.cnf', '[req]\ndistinguished_name=dn\nprompt=no\n[dn]\nCN=qsd-ts Test CA\n[ext]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n');
  cnf('server.cnf', '[req]\ndistinguished_name=dn\nprompt=no\n[dn]\nO=qsd-ts\nCN=localhost\n[ext]\nbasicConstraints=critical,CA:FALSE\n' +
    'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n');
  cnf('client.cnf', '[req]\ndistinguished_name=dn\nprompt=no\n[dn]\nO=qsd-ts\nCN=qsd-client\n[ext]\nbasicConstraints=critical,CA:FALSE\n' +
    'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n');
  const p = (f: string) => path.join(dir, f);
  await run('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', p('ca-key.pem'), '-out', p('ca-cert.pem'),
    '-days', '30', '-config', p('ca.cnf'), '-extensions', 'ext']);
  for (const who of ['server', 'client']) {
    await run('openssl', ['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', p(`${who}-key.pem`), '-out', p(`${who}.csr`), '-config', p(`${who}.cnf`)]);
    await run('openssl', ['x509', '-req', '-in', p(`${who}.csr`), '-CA', p('ca-cert.pem'), '-CAkey', p('ca-key.pem'), '-CAcreateserial',
      '-out', p(`${who}-cert.pem`), '-days', '30', '-extfile', p(`${who}.cnf`), '-extensions', 'ext']);
  }
}

/** Runs a tool; resolves with its combined output and exit status (never rejects). */
async function tool(cmd: string, args: string[]): Promise<{ code: number; out: string }> {
  try {
    const { stdout, stderr } = await run(cmd, args, { timeout: 20000 });
    return { code: 0, out: stdout + stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : 1, out: (e.stdout ?? '') + (e.stderr ?? '') };
  }
}

function waitForSocket(p: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const deadline = Date.now() + 10000;
    const poll = () => {
      if (fs.existsSync(p)) return resolve();
      if (Date.now() > deadline) return reject(new Error(`no socket at ${p}`));
      setTimeout(poll, 50);
    };
    poll();
  });
}

describe('NBD over TLS', function () {
  this.timeout(60000);
  let dir: string;
  let pki: string;
  let pkiNoClient: string;
  let sock: string;
  let img: string;
  let fileNode: BlockNode;
  let exp: NbdExport | undefined;
  const daemon = { objects: new Map(), objectsContainer: false } as unknown as Daemon;
  const children: ChildProcess[] = [];

  const tlsClient = (dirName: string) => `tls-creds-x509,id=tc,dir=${dirName},endpoint=client`;
  const image = (extra = '') => `driver=nbd,server.type=unix,server.path=${sock},export=exp${extra}`;

  async function startServer(extra: Record<string, string> = {}): Promise<void> {
    await nbdServerStart({ addr: { type: 'unix', path: sock }, 'tls-creds': 'ts', ...extra });
    exp = await nbdExportDriver.create(
      { id: 'e0', nodeName: 'file0', node: fileNode, writable: true, writethrough: false, contexts: [], multithread: false },
      { type: 'nbd', id: 'e0', 'node-name': 'file0', name: 'exp', writable: true });
  }

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qsd-tls-'));
    pki = path.join(dir, 'pki');
    pkiNoClient = path.join(dir, 'pki-ca-only');
    await makePki(pki);
    fs.mkdirSync(pkiNoClient);
    fs.copyFileSync(path.join(pki, 'ca-cert.pem'), path.join(pkiNoClient, 'ca-cert.pem'));
    sock = path.join(dir, 'nbd.sock');
    img = path.join(dir, 'disk.img');
    fs.writeFileSync(img, Buffer.alloc(0));
    fs.truncateSync(img, 4 * MiB);
    const options = { driver: 'file', filename: img };
    fileNode = new BlockNode({ nodeName: 'file0', driver: fileDriver, readOnly: false, options });
    fileNode.state = await fileDriver.open(fileNode, options);
    objectAdd(daemon, { 'qom-type': 'tls-creds-x509', id: 'ts', dir: pki, endpoint: 'server' });
    objectAdd(daemon, { 'qom-type': 'tls-creds-x509', id: 'tc', dir: pki, endpoint: 'client' });
    objectAdd(daemon, { 'qom-type': 'authz-simple', id: 'allow', identity: 'O=qsd-ts,CN=qsd-client' });
    objectAdd(daemon, { 'qom-type': 'authz-simple', id: 'deny', identity: 'CN=someone-else' });
  });

  afterEach(async () => {
    if (exp) {
      nbdExportDriver.requestShutdown(exp);
      await nbdExportDriver.delete(exp);
      exp = undefined;
    }
    if (nbdServerRunning()) await nbdServerStop();
  });

  after(async () => {
    for (const c of children) c.kill('SIGKILL');
    await fileDriver.close(fileNode.state);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('object-add loads the files and refuses what QEMU 7.2 refuses', () => {
    assert.throws(() => objectAdd(daemon, { 'qom-type': 'tls-creds-x509', id: 'bad', dir: '/nonexistent', endpoint: 'server' }),
      { message: 'Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory' });
    assert.throws(() => objectAdd(daemon, { 'qom-type': 'tls-creds-x509', id: 'bad', dir: pkiNoClient, endpoint: 'server' }),
      { message: `Unable to access credentials ${pkiNoClient}/server-cert.pem: No such file or directory` });
    assert.throws(() => objectAdd(daemon, { 'qom-type': 'tls-creds-x509', id: 'bad', endpoint: 'server' }),
      { message: "Missing 'dir' property value" });
    assert.throws(() => objectAdd(daemon, { 'qom-type': 'tls-creds-x509', id: 'bad', dir: pki, passwordid: 'nosec' }),
      { message: "No secret with id 'nosec'" });
    assert.throws(() => objectAdd(daemon, { 'qom-type': 'tls-creds-psk', id: 'bad', dir: pki, endpoint: 'server' }),
      { message: `Unable to access credentials ${pki}/keys.psk: No such file or directory` });
    // A client needs no certificate of its own.
    objectAdd(daemon, { 'qom-type': 'tls-creds-x509', id: 'tn', dir: pkiNoClient });
  });

  it('nbd-server-start checks the credentials object and its endpoint', async () => {
    await assert.rejects(nbdServerStart({ addr: { type: 'unix', path: sock }, 'tls-creds': 'nope' }), { message: "No TLS credentials with id 'nope'" });
    await assert.rejects(nbdServerStart({ addr: { type: 'unix', path: sock }, 'tls-creds': 'allow' }),
      { message: "Object with id 'allow' is not TLS credentials" });
    await assert.rejects(nbdServerStart({ addr: { type: 'unix', path: sock }, 'tls-creds': 'tc' }),
      { message: 'Expected TLS credentials for a server endpoint' });
  });

  it('qemu-io writes and reads over TLS; a client without TLS is told TLS is required', async () => {
    await startServer();
    const ok = await tool('qemu-io', ['--object', tlsClient(pki), '--image-opts', image(',tls-creds=tc,tls-hostname=localhost'),
      '-c', 'write -P 0xa5 64k 64k', '-c', 'read -P 0xa5 64k 64k']);
    assert.equal(ok.code, 0, ok.out);
    assert.doesNotMatch(ok.out, /Pattern verification failed/);
    assert.deepEqual(fs.readFileSync(img).subarray(64 * 1024, 128 * 1024), Buffer.alloc(64 * 1024, 0xa5));
    const plain = await tool('qemu-img', ['info', '--image-opts', image()]);
    assert.notEqual(plain.code, 0);
    assert.match(plain.out, /TLS negotiation required before option 7 \(go\)\nDid you forget a valid tls-creds\?\nserver reported: Option 0x7 not permitted before TLS/);
  });

  it('verify-peer: a client without a certificate, or with a bad hostname, fails; others keep working', async () => {
    await startServer();
    const noCert = await tool('qemu-img', ['info', '--object', tlsClient(pkiNoClient), '--image-opts', image(',tls-creds=tc,tls-hostname=localhost')]);
    assert.notEqual(noCert.code, 0);
    const badHost = await tool('qemu-img', ['info', '--object', tlsClient(pki), '--image-opts', image(',tls-creds=tc,tls-hostname=foo')]);
    assert.match(badHost.out, /Certificate does not match the hostname foo/);
    const noHost = await tool('qemu-img', ['info', '--object', tlsClient(pki), '--image-opts', image(',tls-creds=tc')]);
    assert.match(noHost.out, /No hostname for certificate validation/);
    const good = await tool('qemu-img', ['info', '--object', tlsClient(pki), '--image-opts', image(',tls-creds=tc,tls-hostname=localhost')]);
    assert.equal(good.code, 0, good.out);
    assert.match(good.out, /virtual size: 4 MiB/);
  });

  it('tls-authz allows the client DN it names and refuses others', async () => {
    await startServer({ 'tls-authz': 'deny' });
    const denied = await tool('qemu-img', ['info', '--object', tlsClient(pki), '--image-opts', image(',tls-creds=tc,tls-hostname=localhost')]);
    assert.notEqual(denied.code, 0);
    await nbdExportDriver.requestShutdown(exp!);
    await nbdExportDriver.delete(exp!);
    exp = undefined;
    await nbdServerStop();
    await startServer({ 'tls-authz': 'allow' });
    const allowed = await tool('qemu-img', ['info', '--object', tlsClient(pki), '--image-opts', image(',tls-creds=tc,tls-hostname=localhost')]);
    assert.equal(allowed.code, 0, allowed.out);
  });

  it('before TLS: only STARTTLS; others get NBD_REP_ERR_TLS_REQD, EXPORT_NAME and a STARTTLS with payload hang up', async () => {
    await startServer();
    const connect = async () => {
      const s = net.connect(sock);
      s.on('error', () => undefined);
      let buf = Buffer.alloc(0);
      let closed = false;
      s.on('data', (d) => { buf = Buffer.concat([buf, d]); });
      s.on('close', () => { closed = true; });
      const read = async (n: number) => {
        for (let i = 0; buf.length < n && !closed && i < 200; i++) await new Promise((r) => setTimeout(r, 10));
        const out = buf.subarray(0, n);
        buf = buf.subarray(n);
        return out;
      };
      const option = (opt: number, data = Buffer.alloc(0)) => {
        const h = Buffer.alloc(16);
        h.writeBigUInt64BE(abi.NBD_OPTS_MAGIC, 0);
        h.writeUInt32BE(opt, 8);
        h.writeUInt32BE(data.length, 12);
        s.write(Buffer.concat([h, data]));
      };
      const reply = async () => {
        const h = await read(20);
        return { type: h.readUInt32BE(12), data: (await read(h.readUInt32BE(16))).toString() };
      };
      await read(18);
      const f = Buffer.alloc(4);
      f.writeUInt32BE(abi.NBD_FLAG_C_FIXED_NEWSTYLE | abi.NBD_FLAG_C_NO_ZEROES);
      s.write(f);
      return { s, option, reply, isClosed: () => closed, read };
    };
    const c = await connect();
    c.option(abi.NBD_OPT_LIST, Buffer.from('junk'));
    assert.deepEqual(await c.reply(), { type: abi.NBD_REP_ERR_TLS_REQD, data: 'Option 0x3 not permitted before TLS' });
    c.option(abi.NBD_OPT_STRUCTURED_REPLY);
    assert.deepEqual(await c.reply(), { type: abi.NBD_REP_ERR_TLS_REQD, data: 'Option 0x8 not permitted before TLS' });
    c.option(abi.NBD_OPT_EXPORT_NAME, Buffer.from('exp'));
    assert.equal((await c.read(1)).length, 0);
    assert.ok(c.isClosed());
    const d = await connect();
    d.option(abi.NBD_OPT_STARTTLS, Buffer.from('x'));
    assert.deepEqual(await d.reply(), { type: abi.NBD_REP_ERR_INVALID, data: "option 'starttls' has unexpected length" });
    assert.equal((await d.read(1)).length, 0);
    const e = await connect();
    e.option(abi.NBD_OPT_ABORT);
    assert.deepEqual(await e.reply(), { type: abi.NBD_REP_ERR_TLS_REQD, data: 'Option 0x2 not permitted before TLS' });
    // A client that hangs up mid-handshake leaves the server serving others.
    const g = await connect();
    g.option(abi.NBD_OPT_STARTTLS);
    assert.equal((await g.reply()).type, abi.NBD_REP_ACK);
    g.s.write(Buffer.from('not a ClientHello, not at all'));
    assert.equal((await g.read(1000)).length >= 0, true);
    g.s.destroy();
    const good = await tool('qemu-img', ['info', '--object', tlsClient(pki), '--image-opts', image(',tls-creds=tc,tls-hostname=localhost')]);
    assert.equal(good.code, 0, good.out);
  });

  it('tls-creds-psk: qemu-img connects with the right key; an unknown username is refused at object-add', async () => {
    const pskDir = path.join(dir, 'psk');
    fs.mkdirSync(pskDir);
    fs.writeFileSync(path.join(pskDir, 'keys.psk'), `qemu:${'5a'.repeat(32)}\n`);
    const wrongDir = path.join(dir, 'psk-wrong');
    fs.mkdirSync(wrongDir);
    fs.writeFileSync(path.join(wrongDir, 'keys.psk'), `qemu:${'a5'.repeat(32)}\n`);
    assert.throws(() => objectAdd(daemon, { 'qom-type': 'tls-creds-psk', id: 'pu', dir: pskDir, username: 'bob' }),
      { message: `Username bob not found in PSK file ${pskDir}/keys.psk` });
    objectAdd(daemon, { 'qom-type': 'tls-creds-psk', id: 'ps', dir: pskDir, endpoint: 'server' });
    await startServer({ 'tls-creds': 'ps' });
    const ok = await tool('qemu-img', ['info', '--object', `tls-creds-psk,id=tc,dir=${pskDir},endpoint=client`, '--image-opts', image(',tls-creds=tc')]);
    assert.equal(ok.code, 0, ok.out);
    const wrong = await tool('qemu-img', ['info', '--object', `tls-creds-psk,id=tc,dir=${wrongDir},endpoint=client`, '--image-opts', image(',tls-creds=tc')]);
    assert.notEqual(wrong.code, 0);
  });

  describe('nbd driver as a TLS client of qemu-nbd', () => {
    let nbdSock: string;
    before(async () => {
      nbdSock = path.join(dir, 'qemu-nbd.sock');
      fs.writeFileSync(path.join(dir, 'src.img'), Buffer.alloc(MiB, 0x3c));
      const child = spawn('qemu-nbd', ['-t', '-k', nbdSock, '-x', 'exp', '-f', 'raw',
        '--object', `tls-creds-x509,id=t0,dir=${pki},endpoint=server`, '--tls-creds', 't0', path.join(dir, 'src.img')], { stdio: 'ignore' });
      children.push(child);
      await waitForSocket(nbdSock);
    });

    const open = async (extra: Record<string, unknown>) => {
      const options = { driver: 'nbd', server: { type: 'unix', path: nbdSock }, export: 'exp', ...extra } as any;
      const node = new BlockNode({ nodeName: 'n0', driver: nbdDriver, readOnly: true, options });
      node.state = await nbdDriver.open(node, options);
      return node;
    };

    it('reads the export over TLS', async () => {
      const node = await open({ 'tls-creds': 'tc', 'tls-hostname': 'localhost' });
      try {
        const buf = Buffer.alloc(4096);
        await nbdDriver.read(node.state as any, 8192, buf);
        assert.deepEqual(buf, Buffer.alloc(4096, 0x3c));
      } finally {
        await nbdDriver.close(node.state as any);
      }
    });

    it('QEMU 7.2\'s errors: hostname, endpoint, unknown id, missing TLS', async () => {
      await assert.rejects(open({ 'tls-creds': 'tc', 'tls-hostname': 'foo' }), { message: 'Certificate does not match the hostname foo' });
      await assert.rejects(open({ 'tls-creds': 'tc' }), { message: 'No hostname for certificate validation' });
      await assert.rejects(open({ 'tls-creds': 'ts' }), { message: 'Expected TLS credentials for a client endpoint' });
      await assert.rejects(open({ 'tls-creds': 'nope' }), { message: "No TLS credentials with id 'nope'" });
      await assert.rejects(open({}), { message: 'TLS negotiation required before option 7 (go)' });
    });
  });
});
