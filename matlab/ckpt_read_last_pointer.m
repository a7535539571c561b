function name = ckpt_read_last_pointer(folder)
%CKPT_READ_LAST_POINTER  The checkpoint that 'last.txt' names, or '' without a pointer.
%   name = ckpt_read_last_pointer('checkpoints')   % e.g. 'step_00000400.mat'
%   last.txt is a one-line text file rather than a symlink (the Python kit's last.pt):
%   MATLAB cannot make symlinks, and Windows folders often cannot hold them. It is for
%   people and for rotation; a resume always looks for the newest valid checkpoint.
  name = '';
  pointer = fullfile(folder, 'last.txt');
  if isfile(pointer)
    name = strtrim(fileread(pointer));
  end
end

%!test
%! folder = tempname (); mkdir (folder);
%! confirm_recursive_rmdir (false, 'local');
%! assert (ckpt_read_last_pointer (folder), '');
%! ckpt_write_text_atomic (fullfile (folder, 'last.txt'), sprintf ('step_00000400.mat\n'));
%! assert (ckpt_read_last_pointer (folder), 'step_00000400.mat');
%! rmdir (folder, 's');
