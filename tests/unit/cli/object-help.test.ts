// --object help and --object <type>,help: QEMU 7.2's layout for every class qsd-ts knows.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { objectTypeHelp, objectTypesHelp } from '../../../src/qmp/commands/qom.js';

/** QEMU 7.2's output, or undefined when its daemon is not installed. */
function qemu(arg: string): string | undefined {
  try {
    return execFileSync('/usr/bin/qemu-storage-daemon', ['--object', arg], { encoding: 'utf8', timeout: 5000 });
  } catch {
    return undefined;
  }
}

describe('cli/object help', () => {
  it('lists only the types object-add can create, sorted', () => {
    assert.equal(
      objectTypesHelp(),
      'List of user creatable objects:\n  authz-simple\n  iothread\n  secret\n  throttle-group\n  tls-creds-psk\n  tls-creds-x509\n',
    );
  });

  it('prints settable properties sorted as whole lines, QEMU 7.2 byte for byte', function () {
    const expected: Record<string, string> = {
      secret: 'secret options:\n  data=<string>\n  file=<string>\n  format=<QCryptoSecretFormat>\n  iv=<string>\n  keyid=<string>\n',
      'event-loop-base': 'event-loop-base options:\n  aio-max-batch=<int>\n  thread-pool-max=<int>\n  thread-pool-min=<int>\n',
      'chardev-socket': 'There are no options for chardev-socket.\n',
      container: 'There are no options for container.\n',
    };
    for (const [type, text] of Object.entries(expected)) assert.equal(objectTypeHelp(type), text, type);
    assert.equal(objectTypeHelp('bogus'), undefined);
    const throttle = objectTypeHelp('throttle-group')!.split('\n');
    // '-' sorts before '=': x-bps-read-max-length, x-bps-read-max, x-bps-read.
    assert.deepEqual(throttle.slice(0, 5), ['throttle-group options:', '  limits=<ThrottleLimits>',
      '  x-bps-read-max-length=<int>', '  x-bps-read-max=<int>', '  x-bps-read=<int>']);
    if (qemu('help') === undefined) this.skip();
    for (const type of ['iothread', 'secret', 'throttle-group', 'secret_common', 'event-loop-base', 'object',
      'interface', 'user-creatable', 'chardev', 'chardev-socket', 'chardev-null', 'chardev-ringbuf']) {
      assert.equal(objectTypeHelp(type), qemu(`${type},help`), type);
    }
  });
});
