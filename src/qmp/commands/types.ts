// What a command handler receives besides its validated arguments.
import type { Daemon } from '../../daemon.js';
import type { Monitor } from '../connection.js';

export interface CommandContext {
  readonly daemon: Daemon;
  /** The monitor the command came from; undefined on the command line. */
  readonly monitor?: Monitor;
}

/** Arguments are already validated against the schema. Throw QmpError to fail. */
export type CommandHandler = (args: any, ctx: CommandContext) => unknown | Promise<unknown>;
