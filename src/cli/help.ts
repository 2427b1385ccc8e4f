// --help and --version texts: QEMU 7.2's, less the export types qsd-ts lacks (as a QEMU build without them).
import { PACKAGE_VERSION, QEMU_VERSION } from '../version.js';

/**
 * QEMU prints "qemu-storage-daemon version <x.y.z> (<package version>)" whatever argv[0] is; a script
 * reading the third word gets the QEMU interface level we implement, the parentheses name us.
 * (QEMU's second line is its copyright notice, which is not ours to print.)
 */
export function versionText(): string {
  const { major, minor, micro } = QEMU_VERSION;
  return `qemu-storage-daemon version ${major}.${minor}.${micro} (qsd-ts ${PACKAGE_VERSION})\n` +
    'A QEMU-compatible storage daemon written in TypeScript\n';
}

export function helpText(program: string): string {
  return `Usage: ${program} [options]
QEMU storage daemon

  -h, --help             display this help and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         configure a block backend

  --chardev <options>    configure a character device backend
                         (see the qemu(1) man page for possible options)

  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete

  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export the specified block node over NBD
                         (requires --nbd-server)

  --export [type=]fuse,id=<id>,node-name=<node-name>,mountpoint=<file>
           [,growable=on|off][,writable=on|off][,allow-other=on|off|auto]
           [,iothread=<id>|iothread.0=<id>,iothread.1=<id>...]
           [,io-uring=on|off]
                         export the specified block node over FUSE

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor

  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes

  --object help          list object types that can be added
  --object <type>,help   list properties for the given object type
  --object <type>[,<property>=<value>...]
                         create a new object of type <type>, setting
                         properties in the order they are specified. Note
                         that the 'id' property must be set.
                         See the qemu(1) man page for documentation of the
                         objects that can be added.

  --pidfile <path>       write process ID to a file after startup
`;
}
