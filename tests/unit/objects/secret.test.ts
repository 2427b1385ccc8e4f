// secret objects: loading (raw, base64, file, AES-256-CBC) and the lookup other code uses.
import { strict as assert } from 'node:assert';
import { createCipheriv } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Daemon } from '../../../src/daemon.js';
import { objectAdd } from '../../../src/qmp/commands/qom.js';
import { secretString, secretValue } from '../../../src/objects/secret.js';

describe('secret objects', () => {
  let daemon: Daemon;
  let dir: string;
  beforeEach(() => {
    daemon = new Daemon();
    daemon.onExit = () => undefined;
    dir = mkdtempSync(join(tmpdir(), 'qsd-secret-'));
  });
  afterEach(async () => {
    rmSync(dir, { recursive: true, force: true });
    await daemon.requestExit();
  });

  it('holds raw data, base64 data and file contents', () => {
    objectAdd(daemon, { 'qom-type': 'secret', id: 's0', data: 'abc' });
    objectAdd(daemon, { 'qom-type': 'secret', id: 's1', data: Buffer.from('x\0y').toString('base64'), format: 'base64' });
    writeFileSync(join(dir, 'f'), 'from file\n');
    objectAdd(daemon, { 'qom-type': 'secret', id: 's2', file: join(dir, 'f') });
    assert.equal(secretString(daemon, 's0'), 'abc');
    assert.deepEqual(secretValue(daemon, 's1'), Buffer.from('x\0y'));
    assert.equal(secretString(daemon, 's2'), 'from file\n');
  });

  it('decrypts a secret keyed by another', () => {
    const key = Buffer.alloc(32, 7);
    const iv = Buffer.alloc(16, 3);
    const c = createCipheriv('aes-256-cbc', key, iv);
    const data = Buffer.concat([c.update('hunter2'), c.final()]).toString('base64');
    objectAdd(daemon, { 'qom-type': 'secret', id: 'k', data: key.toString('base64'), format: 'base64' });
    objectAdd(daemon, { 'qom-type': 'secret', id: 'p', data, format: 'base64', keyid: 'k', iv: iv.toString('base64') });
    assert.equal(secretString(daemon, 'p'), 'hunter2');
  });

  it("refuses lookups with QEMU's messages", () => {
    objectAdd(daemon, { 'qom-type': 'iothread', id: 'io0' });
    objectAdd(daemon, { 'qom-type': 'secret', id: 'bin', data: '/w==', format: 'base64' });
    assert.throws(() => secretValue(daemon, 'nope'), { message: "No secret with id 'nope'" });
    assert.throws(() => secretValue(daemon, 'io0'), { message: "Object with id 'io0' is not a secret" });
    assert.throws(() => secretString(daemon, 'bin'), { message: 'Data from secret bin is not valid UTF-8' });
  });

  it('leaves nothing behind when loading fails', () => {
    assert.throws(() => objectAdd(daemon, { 'qom-type': 'secret', id: 's0', file: join(dir, 'missing') }),
      { message: /^Unable to read .*missing: Failed to open file/ });
    assert.throws(() => secretValue(daemon, 's0'), { message: "No secret with id 's0'" });
    objectAdd(daemon, { 'qom-type': 'secret', id: 's0', data: 'ok' });
    assert.equal(secretString(daemon, 's0'), 'ok');
  });
});
